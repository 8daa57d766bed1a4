"""llama.cpp's other block formats, transcoded at load into the formats the kernels run.

Each type goes where its values land exactly (up to the fp16 rounding of scale products):

- Q4_K -> 4-bit asymmetric: a super-block's sub-block of 32 is w = (d * sc) * q - (dmin * m), q in
  0..15, so its scale d * sc and min -dmin * m are a group-32 Q4_1-style pair. Exact up to the fp16
  rounding of those two products.
- IQ4_XS -> 4-bit codebook (the IQ4_NL kind): a super-block's sub-block of 32 is w = (d * (ls - 32))
  * IQ4_NL_VALUES[q], and its nibbles are already in our run order; exact up to the fp16 rounding of
  d * (ls - 32).
- Q5_0 -> 8-bit symmetric: q - 16 is an int8, so int8 * fp16 exactly.
- Q5_1 -> 8-bit asymmetric: w = d * q + m, q in 0..31, with the block's own fp16 d and m: exact.
- Q5_K -> 8-bit asymmetric: as Q4_K with 5-bit q; exact up to the fp16 rounding of d * sc and
  dmin * m.
- Q6_K, Q3_K -> 8-bit symmetric with a scale per 16 values (their sub-blocks): w = (d * sc) * q,
  q in -32..31 resp. -4..3; exact up to the fp16 rounding of d * sc.
- Q2_K -> 8-bit asymmetric with a scale and a min per 16 values: w = (d * sc) * q - dmin * m,
  q in 0..3; exact up to the fp16 rounding of the two products.

Q8_0, Q4_0, Q4_1 and IQ4_NL need none of this: `GGUFFile.load` reads them in place.

Rows are transcoded in chunks (a bounded float32 scratch whatever the matrix), and the file's pages
under each chunk are dropped once read, so a load holds the source and its transcoded copy of one
matrix only, never of the model.
"""

from __future__ import annotations

import mmap

import numpy as np

from vlm.memory import release_pages
from vlm.quant import QuantizedWeight

QK_K = 256  # values per K-quant super-block

_CHUNK_VALUES = 1 << 16  # values transcoded at once: a few MiB of scratch


def _half(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at bytes [at, at + 2) of each block, as float32 [..., 1]."""
    return np.ascontiguousarray(b[..., at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Runs of 16 bytes -> 32 values 0..15: byte j holds value j (low nibble) and j + 16 (high)."""
    runs = qs.reshape(*qs.shape[:-1], -1, 16)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=-1).reshape(*qs.shape[:-1], -1)


def _bits(b: np.ndarray) -> np.ndarray:
    """The bits of each block's bytes, least significant first: [..., n] -> [..., 8 n] of 0/1."""
    return np.unpackbits(np.ascontiguousarray(b), axis=-1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 6-bit (scale, min) of the 8 sub-blocks, each [..., 8] float32."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# --- exact transcoders: blocks uint8 [rows, blocks, bytes] -> the target's arrays for those rows ----------


def _k_groups(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: each sub-block's scale d * sc and min -dmin * m, fp16 [rows, sub-blocks]."""
    sc, mn = _k_scales(b[..., 4:16])
    scales, mins = _half(b, 0) * sc, -(_half(b, 2) * mn)
    return scales.astype(np.float16).reshape(b.shape[0], -1), mins.astype(np.float16).reshape(b.shape[0], -1)


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = b.shape[0]
    # 4 chunks of 32 bytes; chunk j: sub-block 2j in the low nibbles, 2j + 1 in the high ones, value
    # l of each at byte l. Our runs want value i low and value i + 16 high in byte i.
    q = b[..., 16:].reshape(rows, -1, 4, 2, 16)
    first, second = q[..., 0, :], q[..., 1, :]  # bytes 0..15 and 16..31 of a chunk
    even = (first & 0x0F) | (second << 4)
    odd = (first >> 4) | (second & 0xF0)
    return np.stack([even, odd], axis=-2).reshape(rows, -1), *_k_groups(b)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = _nibbles(b[..., 6:]) | (_bits(b[..., 2:6]) << 4)
    return (q.astype(np.int8) - 16).reshape(b.shape[0], -1), b[..., 0:2].copy().view(np.float16)[..., 0]


def _iq4_xs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = b.shape[0]
    high = _bits(b[..., 2:4]).reshape(rows, -1, 8, 2)  # 2 bits per sub-block
    low = np.stack([b[..., 4:8] & 0x0F, b[..., 4:8] >> 4], axis=-1).reshape(rows, -1, 8)  # sub-block 2i, 2i + 1
    ls = low.astype(np.int32) | ((high[..., 0] | high[..., 1] << 1).astype(np.int32) << 4)
    scales = (_half(b, 0) * (ls - 32).astype(np.float32)).astype(np.float16)
    return b[..., 8:].reshape(rows, -1), scales.reshape(rows, -1)


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = b.shape[0]
    q = _nibbles(b[..., 8:]) | (_bits(b[..., 4:8]) << 4)
    half = b[..., 0:4].copy().view(np.float16)  # d, m
    return q.astype(np.int8).reshape(rows, -1), half[..., 0], half[..., 1]


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = b.shape[0]
    qs = b[..., 48:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    low = (qs & 0x0F).reshape(rows, -1, 8, 32)
    high = (b[..., 16:48].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    return (low | (high << 4)).astype(np.int8).reshape(rows, -1), *_k_groups(b)


# --- groups of 16 (8-bit only): the sub-blocks of Q6_K, Q3_K and Q2_K -------------------------------


def _fp16(x: np.ndarray, rows: int) -> np.ndarray:
    return x.astype(np.float16).reshape(rows, -1)


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = b.shape[0]
    ql = b[..., :128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q = ((ql & 0x0F).reshape(rows, -1, 8, 32) | ((qh & 0x03).reshape(rows, -1, 8, 32) << 4)).astype(np.int8) - 32
    return q.reshape(rows, -1), _fp16(_half(b, 208) * b[..., 192:208].view(np.int8).astype(np.float32), rows)


def _q2_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = b.shape[0]
    s = b[..., :16]
    q = (b[..., 16:80].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    scales, mins = _half(b, 80) * (s & 0x0F).astype(np.float32), -(_half(b, 82) * (s >> 4).astype(np.float32))
    return q.astype(np.int8).reshape(rows, -1), _fp16(scales, rows), _fp16(mins, rows)


def _q3_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = b.shape[0]
    s = b[..., 96:108]
    low = (s[..., :8].reshape(rows, -1, 1, 8) >> np.array([0, 4], np.uint8).reshape(2, 1)).reshape(rows, -1, 16)
    high = (s[..., 8:].reshape(rows, -1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)).reshape(rows, -1, 16)
    scales = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.float32) - 32
    ql = (b[..., 32:96].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    hm = (b[..., :32].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
    q = ql.reshape(rows, -1, 8, 32).astype(np.int8) - 4 * (1 - hm.reshape(rows, -1, 8, 32).astype(np.int8))
    return q.reshape(rows, -1), _fp16(_half(b, 108) * scales, rows)


# kind -> (transcoder, the kind it lands in, its group): the transcoder gives qweight, scales (and mins)
_TARGETS = {
    "Q4_K": (_q4_k, "q4_asym", 32), "IQ4_XS": (_iq4_xs, "iq4_nl", 32), "Q5_0": (_q5_0, "q8", 32),
    "Q5_1": (_q5_1, "q8_asym", 32), "Q5_K": (_q5_k, "q8_asym", 32), "Q6_K": (_q6_k, "q8", 16),
    "Q2_K": (_q2_k, "q8_asym", 16), "Q3_K": (_q3_k, "q8", 16),
}
TRANSCODED = tuple(_TARGETS)


def _owned(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """An array in a mapping of its own, unmapped when freed: the heap (whose trim threshold the kernels
    raise) would keep the hole of the largest transcoded matrix, as unused memory, until the load ends."""
    count = shape[0] * shape[1]
    return np.frombuffer(mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize)), dtype, count).reshape(shape)


def transcode(kind: str, blocks: np.ndarray) -> QuantizedWeight:
    """A matrix of `kind` blocks (uint8 [rows, blocks per row, bytes per block], e.g. a view of a
    file map) in a kind the kernels run; the source's file pages are dropped as they are read."""
    rows, n_blocks, _ = blocks.shape
    cols = n_blocks * (QK_K if kind.endswith("_K") or kind == "IQ4_XS" else 32)
    convert, target, group = _TARGETS[kind]
    bits = 8 if target.startswith("q8") else 4
    qweight = _owned((rows, cols // 2), np.uint8) if bits == 4 else _owned((rows, cols), np.int8)
    scales = _owned((rows, cols // group), np.float16)
    mins = _owned((rows, cols // group), np.float16) if target.endswith("_asym") else None
    step = max(1, _CHUNK_VALUES // cols)
    for r in range(0, rows, step):
        chunk = blocks[r : r + step]
        part = slice(r, r + chunk.shape[0])
        arrays = convert(chunk)
        qweight[part], scales[part] = arrays[:2]
        if mins is not None:
            mins[part] = arrays[2]
        release_pages(chunk)
    return QuantizedWeight(bits, group, mins is None, qweight, scales, mins, codebook=target == "iq4_nl")
