import numpy as np
import pytest

from vlm.quant import HalfWeight, QuantizedWeight, pack_nibbles, quantize, relative_rms_error, unpack_nibbles


def test_pack_unpack_inverse():
    q = np.random.default_rng(0).integers(0, 16, size=(5, 64), dtype=np.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 32)
    assert np.array_equal(unpack_nibbles(packed), q)
    # GGUF order: byte j holds value j (low nibble) and value j + 16 (high nibble).
    assert packed[0, 3] == q[0, 3] | (q[0, 19] << 4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_q4_round_trip_error_bound(group_size, symmetric):
    w = np.random.default_rng(1).normal(size=(48, 256)).astype(np.float32)
    qw = quantize(w, 4, group_size, symmetric)
    assert qw.shape == w.shape and qw.bits == 4 and qw.qweight.dtype == np.uint8
    deq = qw.dequantize()
    # Asymmetric: within half a step (plus fp16 rounding of scale and min). Symmetric (Q4_0's
    # rule): the extreme maps to -8, so the other side tops out at +7 and may be a step off.
    d = qw.scales.astype(np.float32).repeat(group_size, axis=1)
    steps = 1.0 if symmetric else 0.5
    assert np.all(np.abs(deq - w) <= steps * np.abs(d) * 1.01 + 1e-3)
    assert relative_rms_error(w, qw) < 0.13  # ~0.09-0.11 for Gaussian weights at 4 bits


def test_q4_asym_is_exact_on_grid_values():
    # Values already on a 4-bit grid (as a dequantized Q4_1 tensor is) come back unchanged.
    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, size=(4, 64))
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15  # each group spans the full range
    w = (q * 0.125 - 1.0).astype(np.float32)
    assert np.array_equal(quantize(w, 4, 32).dequantize(), w)


def test_q8_round_trip():
    w = np.random.default_rng(3).normal(size=(16, 96)).astype(np.float32)
    qw = quantize(w, 8, 32)
    assert qw.kind == "q8" and qw.qweight.dtype == np.int8
    assert relative_rms_error(w, qw) < 0.01


def test_dequantize_rows_selection():
    w = np.random.default_rng(4).normal(size=(10, 64)).astype(np.float32)
    qw = quantize(w, 4, 32)
    full = qw.dequantize()
    assert np.array_equal(qw.dequantize(np.array([7, 2])), full[[7, 2]])
    assert np.array_equal(qw.dequantize(slice(3, 6)), full[3:6])


def test_zero_groups_and_nbytes():
    w = np.zeros((2, 64), np.float32)
    for qw in (quantize(w, 4, 32), quantize(w, 4, 32, True), quantize(w, 8, 32)):
        assert np.array_equal(qw.dequantize(), w)
    qw = quantize(np.ones((8, 128), np.float32), 4, 32)
    assert isinstance(qw, QuantizedWeight) and qw.nbytes == 8 * 64 + 2 * 8 * 4 * 2


def test_bad_arguments():
    w = np.ones((2, 48), np.float32)
    with pytest.raises(ValueError):
        quantize(w, 4, 32)  # 48 columns are not whole groups of 32
    with pytest.raises(ValueError):
        quantize(np.ones((2, 64)), 3, 32)
    with pytest.raises(ValueError):
        quantize(np.ones((2, 64)), 4, 16)


def test_quantize_works_in_row_chunks_and_reads_stored_weights(monkeypatch):
    from vlm import quant

    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 64)).astype(np.float16)
    whole = quantize(w.astype(np.float32), 4, 32)
    monkeypatch.setattr(quant, "_CHUNK_VALUES", 8 * 64)  # 8 rows a chunk: 5 chunks, the last one short
    chunked = quantize(HalfWeight(w), 4, 32)  # a 16-bit weight is widened chunk by chunk
    for field in ("qweight", "scales", "mins"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))
    assert abs(relative_rms_error(HalfWeight(w), chunked) - relative_rms_error(w.astype(np.float32), whole)) < 1e-6
