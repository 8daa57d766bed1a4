"""Group-wise weight quantization: the format every loader produces and every kernel reads.

A quantized matrix W [rows, cols] is cut along `cols` into groups of `group_size` values,
each with its own fp16 scale (and, for the asymmetric forms, an fp16 min):

- 4-bit asymmetric (GGUF Q4_1):  w = d * q + m,   q in 0..15
- 4-bit symmetric  (GGUF Q4_0):  w = d * (q - 8), q in 0..15
- 8-bit symmetric  (GGUF Q8_0):  w = d * q,       q in -127..127
- 8-bit asymmetric (GGUF Q5_1, Q5_K): w = d * q + m, q in -128..127 (0..31 from those files)
- 4-bit codebook   (GGUF IQ4_NL): w = d * IQ4_NL_VALUES[q], q in 0..15 (a fixed non-uniform int8 grid)

4-bit values are packed two to a byte in GGUF's order, so GGUF Q4_0/Q4_1 blocks map on
without re-quantizing: inside every run of 32 values, byte j holds value j in its low
nibble and value j + 16 in its high nibble. A group of 64 or 128 is simply 2 or 4 such
runs sharing one scale.

The numpy code here is the reference: C kernels are tested against `dequantize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK = 32  # nibble-packing run; every group size is a multiple of it
GROUP_SIZES = (32, 64, 128)
# Precision modes on load (None: as the file holds it). q4: 4-bit scale+min (like Q4_1); q4_sym:
# 4-bit scale only (like Q4_0); q8: 8-bit; f32: everything widened (exact math).
QUANTIZE_MODES = (None, "q4", "q4_sym", "q8", "f32")
VISION_MODES = (None, "f32", "f16", "q8")
# llama.cpp's kvalues_iq4nl: the int8 values IQ4_NL's (and IQ4_XS's) 4-bit indices stand for.
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


@dataclass
class QuantizedWeight:
    """A [rows, cols] matrix in group-wise 4- or 8-bit form."""

    bits: int  # 4 or 8
    group_size: int
    symmetric: bool
    # 4-bit: uint8 [rows, cols // 2]; 8-bit: int8 [rows, cols]. Or, read in place from a GGUF
    # file's interleaved blocks, a strided view [rows, cols // 32, 16 or 32] of one run per block.
    qweight: np.ndarray
    scales: np.ndarray  # float16 [rows, cols // group_size], possibly strided
    mins: np.ndarray | None = None  # float16 [rows, cols // group_size]; asymmetric forms only
    codebook: bool = False  # symmetric 4-bit only: q indexes IQ4_NL_VALUES instead of meaning q - 8

    @property
    def shape(self) -> tuple[int, int]:
        rows, stored = self.qweight.shape[0], math.prod(self.qweight.shape[1:])
        return rows, stored * 2 if self.bits == 4 else stored

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)

    @property
    def kind(self) -> str:
        """Short name used in reports and in the converted model's config: q4_asym, q4_sym, iq4_nl,
        q8, q8_asym."""
        if self.codebook:
            return "iq4_nl"
        if self.bits == 8:
            return "q8" if self.symmetric else "q8_asym"
        return "q4_sym" if self.symmetric else "q4_asym"

    def dequantize(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Float32 values of the matrix, or of the rows selected by a slice or index array."""
        sel = slice(None) if rows is None else rows
        scales = self.scales[sel].astype(np.float32)
        n_rows, n_groups = scales.shape
        if self.bits == 8:
            q = self.qweight[sel].astype(np.float32).reshape(n_rows, n_groups, self.group_size)
            w = q * scales[..., None]
            if not self.symmetric:
                w = w + self.mins[sel].astype(np.float32)[..., None]
            return w.reshape(n_rows, -1)
        q = unpack_nibbles(self.qweight[sel])
        if self.codebook:
            w = IQ4_NL_VALUES.astype(np.float32)[q].reshape(n_rows, n_groups, self.group_size) * scales[..., None]
            return w.reshape(n_rows, -1)
        q = q.astype(np.float32).reshape(n_rows, n_groups, self.group_size)
        if self.symmetric:
            w = (q - 8.0) * scales[..., None]
        else:
            w = q * scales[..., None] + self.mins[sel].astype(np.float32)[..., None]
        return w.reshape(n_rows, -1)


@dataclass
class HalfWeight:
    """A float matrix kept in its 16-bit storage (fp16, or bf16 as raw uint16 bits), widened on use."""

    data: np.ndarray  # float16, or uint16 holding bfloat16 bits
    bf16: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def kind(self) -> str:
        return "bf16" if self.bf16 else "f16"

    def dequantize(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        d = self.data if rows is None else self.data[rows]
        if self.bf16:
            return (d.astype(np.uint32) << 16).view(np.float32)
        return d.astype(np.float32)


# A weight in any stored form: float32 array, 16-bit floats, or grouped integers.
Weight = np.ndarray | HalfWeight | QuantizedWeight


def dequantize(w: Weight) -> np.ndarray:
    """Float32 copy of any weight."""
    return np.asarray(w, dtype=np.float32) if isinstance(w, np.ndarray) else w.dequantize()


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols // 2] (or [rows, runs, 16]) in GGUF nibble order -> uint8 [rows, cols] of values 0..15."""
    rows = packed.shape[0]
    runs = packed.reshape(rows, -1, BLOCK // 2)
    return np.concatenate([runs & 0x0F, runs >> 4], axis=-1).reshape(rows, -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] of values 0..15 -> uint8 [rows, cols // 2] in GGUF nibble order."""
    rows = q.shape[0]
    runs = q.reshape(rows, -1, BLOCK).astype(np.uint8)
    return (runs[..., : BLOCK // 2] | (runs[..., BLOCK // 2 :] << 4)).reshape(rows, -1)


def can_quantize(shape: tuple[int, ...], group_size: int) -> bool:
    return len(shape) == 2 and shape[1] % group_size == 0


# Values quantized at once: bounds the float32 scratch whatever the matrix (a 150k-token
# embedding widened whole would be ~1 GB).
_CHUNK_VALUES = 1 << 20


def _float_rows(w: Weight, rows: slice) -> np.ndarray:
    return np.asarray(w[rows], dtype=np.float32) if isinstance(w, np.ndarray) else w.dequantize(rows)


def _row_chunks(shape: tuple[int, ...]) -> list[slice]:
    step = max(1, _CHUNK_VALUES // max(1, shape[1]))
    return [slice(r, r + step) for r in range(0, shape[0], step)] or [slice(0, 0)]


def stored_arrays(w: Weight) -> list[np.ndarray]:
    """The arrays a weight's values are stored in."""
    if isinstance(w, QuantizedWeight):
        return [a for a in (w.qweight, w.scales, w.mins) if a is not None]
    return [w.data] if isinstance(w, HalfWeight) else [w]


def quantize(w: Weight, bits: int = 4, group_size: int = 32,
             symmetric: bool = False) -> QuantizedWeight:
    """Quantize a matrix [rows, cols] (a float array, or a stored weight to re-quantize); cols
    must be a multiple of group_size. Rows are done in chunks, so scratch memory stays small."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if len(w.shape) != 2:
        raise ValueError(f"can only quantize a matrix, got shape {tuple(w.shape)}")
    if w.shape[1] % group_size:
        raise ValueError(f"cannot quantize a matrix with {w.shape[1]} columns in groups of {group_size}")
    parts = [_quantize_rows(_float_rows(w, rows), bits, group_size, symmetric) for rows in _row_chunks(w.shape)]
    if len(parts) == 1:
        return parts[0]
    mins = None if parts[0].mins is None else np.concatenate([p.mins for p in parts])
    return QuantizedWeight(bits, group_size, parts[0].symmetric, np.concatenate([p.qweight for p in parts]),
                           np.concatenate([p.scales for p in parts]), mins)


def _quantize_rows(w: np.ndarray, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    if bits == 8:
        d = np.abs(g).max(axis=-1) / 127.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        q = np.clip(np.rint(g * inv[..., None]), -127, 127).astype(np.int8)
        return QuantizedWeight(8, group_size, True, q.reshape(rows, cols), d.astype(np.float16))
    if symmetric:
        # Q4_0's rule: the value of largest magnitude maps to -8, so its sign keeps full range.
        idx = np.abs(g).argmax(axis=-1)
        extreme = np.take_along_axis(g, idx[..., None], axis=-1)[..., 0]
        d = (extreme / -8.0).astype(np.float16)
        d32 = d.astype(np.float32)
        inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
        q = np.clip(np.rint(g * inv[..., None] + 8.0), 0, 15).astype(np.uint8)
        return QuantizedWeight(4, group_size, True, pack_nibbles(q.reshape(rows, cols)), d)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    d = ((hi - lo) / 15.0).astype(np.float16)
    m = lo.astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 > 0)
    q = np.clip(np.rint((g - m.astype(np.float32)[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    return QuantizedWeight(4, group_size, False, pack_nibbles(q.reshape(rows, cols)), d, m)


def relative_rms_error(w: Weight, qw: QuantizedWeight) -> float:
    """||W - deq(Q(W))|| / ||W||: the per-layer quantization error that `vlm convert` reports."""
    err2 = norm2 = 0.0
    for rows in _row_chunks(w.shape):
        x = _float_rows(w, rows)
        err2 += float(np.sum(np.square(x - qw.dequantize(rows)), dtype=np.float64))
        norm2 += float(np.sum(np.square(x), dtype=np.float64))
    return math.sqrt(err2) / (math.sqrt(norm2) or 1.0)
