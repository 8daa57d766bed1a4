"""llama.cpp's K-quants, Q5_0/Q5_1 and IQ4 types: loaded values against gguf-py's dequantizers."""

import numpy as np
import pytest

from vlm import kernels
from vlm.formats.gguf import GGML_TYPES, GGUFFile, read_blocks
from vlm.formats.gguf_quants import TRANSCODED, transcode

gguf = pytest.importorskip("gguf")

# Byte offsets of each type's fp16 super-scales inside its block (the rest may be any bytes).
HALF_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,),
               "Q5_0": (0,), "Q5_1": (0, 2), "IQ4_NL": (0,), "IQ4_XS": (0,)}
EXACT = ("Q5_0", "Q5_1", "IQ4_NL")  # integers * the block's own fp16 scale (+ fp16 min): bit for bit
# The rest have scales (and mins) that are fp16 products of two stored numbers; the largest |q| each scales.
Q_MAX = {"Q4_K": 15, "Q5_K": 31, "IQ4_XS": 127, "Q6_K": 32, "Q3_K": 4, "Q2_K": 3}
# type -> the kind and group it loads as
TARGET = {"Q4_K": ("q4_asym", 32), "Q5_0": ("q8", 32), "Q5_1": ("q8_asym", 32), "Q5_K": ("q8_asym", 32),
          "Q6_K": ("q8", 16), "Q3_K": ("q8", 16), "Q2_K": ("q8_asym", 16), "IQ4_NL": ("iq4_nl", 32),
          "IQ4_XS": ("iq4_nl", 32)}
LOADED = (*TRANSCODED, "IQ4_NL")  # IQ4_NL is read in place


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of `kind`: random bytes, with sane fp16 scales."""
    _, per_block, size = next(v for v in GGML_TYPES.values() if v[0] == kind)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // per_block, size), dtype=np.uint8)
    for at in HALF_FIELDS[kind]:
        half = (rng.uniform(0.5, 2.0, size=blocks.shape[:2]) * 1e-3).astype(np.float16)
        blocks[..., at : at + 2] = half[..., None].view(np.uint8)
    return blocks


def check_against_gguf(kind: str, blocks: np.ndarray) -> None:
    """The loaded blocks against gguf-py's dequantization of the same bytes: exact, or within the
    fp16 rounding of the scale products."""
    rows = blocks.shape[0]
    ref = gguf.quants.dequantize(blocks.reshape(rows, -1), gguf.GGMLQuantizationType[kind]).astype(np.float32)
    w = read_blocks(kind, blocks)
    cols = ref.shape[1]
    assert w.shape == (rows, cols) and (w.kind, w.group_size) == TARGET[kind]
    got = w.dequantize()
    if kernels.AVAILABLE:  # packed for the kernels (from the views, in place) and read back: the same values
        assert np.array_equal(kernels.unpack_rows(kernels.prepare(w), np.arange(rows)), got)
    if kind in EXACT:
        assert np.array_equal(got, ref)
        return
    # Scale s and min m are rounded to fp16, half a unit in the 11th bit: w = s q + m moves by at
    # most 2^-11 (|q| |s| + |m|).
    group = w.group_size
    err = np.abs(got - ref).reshape(rows, -1, group)
    amax = np.abs(ref).reshape(rows, -1, group).max(axis=-1, keepdims=True)
    bound = 2.0**-11 * Q_MAX[kind] * np.abs(w.scales.astype(np.float32))[..., None]
    if w.mins is not None:
        bound += 2.0**-11 * np.abs(w.mins.astype(np.float32))[..., None]
    assert (err <= bound * 1.001 + amax * 2.0**-22).all()
    assert err.max() > 0  # the rounding is real: the bound is what the test checks


@pytest.mark.parametrize("kind", LOADED)
def test_values_equal_gguf_dequantize(kind):
    check_against_gguf(kind, random_blocks(kind, 40, 512))


@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_K_M", "IQ4_NL"])
def test_real_llama_cpp_files(file_type, llama_cpp_quant):
    """Every tensor type in SmolLM2 as llama.cpp quantized it (Q4_K_M holds Q4_K, Q5_0, Q6_K, Q8_0;
    Q5_K_M Q5_K, Q5_1; IQ4_NL IQ4_NL, Q5_K): one matrix of each, checked whole."""
    f = GGUFFile(llama_cpp_quant(file_type))
    seen = set()
    for t in f.tensors.values():
        if t.type_name in LOADED and t.type_name not in seen:
            seen.add(t.type_name)
            _, per_block, size = GGML_TYPES[t.ggml_type]
            raw = f._data[t.offset : t.offset + t.nbytes]
            check_against_gguf(t.type_name, raw.reshape(t.shape[0], t.shape[1] // per_block, size))
    assert seen == {"Q4_K_M": {"Q4_K", "Q5_0", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q5_1", "Q6_K"},
                    "IQ4_NL": {"IQ4_NL", "Q5_K"}}[file_type]


def test_rows_are_transcoded_in_chunks(monkeypatch):
    from vlm.formats import gguf_quants

    blocks = random_blocks("Q4_K", 24, 1024, seed=1)
    whole = transcode("Q4_K", blocks)
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 5 * 1024)  # 5 rows a chunk: a ragged last one
    chunked = transcode("Q4_K", blocks)
    for a, b in zip((whole.qweight, whole.scales, whole.mins), (chunked.qweight, chunked.scales, chunked.mins),
                    strict=True):
        assert np.array_equal(a, b)


def test_iq4_nl_survives_the_native_format(tmp_path, tiny_converted):
    """A converted model keeps an IQ4_NL matrix as it is (kind iq4_nl), and loads and runs it."""
    import vlm
    from vlm.formats.native import read_native, write_native

    ckpt = read_native(tiny_converted)
    name = next(n for n, w in ckpt.tensors.items() if n.endswith("mlp.up_proj.weight"))
    rows, cols = ckpt.tensors[name].shape
    iq4 = read_blocks("IQ4_NL", random_blocks("IQ4_NL", rows, cols))
    write_native(tmp_path, ckpt.config, {**ckpt.tensors, name: iq4}, ckpt.files, ckpt.quantization)
    back = read_native(tmp_path).tensors[name]
    assert back.kind == "iq4_nl" and np.array_equal(back.dequantize(), iq4.dequantize())
    model = vlm.load(tmp_path)
    assert model.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2).tokens
