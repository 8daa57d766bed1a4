"""C attention (`vlm.kernels.attention`) against the numpy reference (`layers.attend_numpy`, in float64).

The kernels sum in float32 and take e^x from a polynomial good to a few ulp, so an output is
within ~1e-6 of v's scale; 1e-5 leaves room. Every dispatch path is forced in turn.
Two kernels are covered: the block kernel (queries in lanes: prefill, vision) and the rows
kernel (one query: a decode step), the latter also with the cache split over threads (t > 256).
Any call of two or more queries takes the block kernel (see attention.c).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from vlm import kernels
from vlm.models import layers

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="native kernels not built")


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_qkv(h: int, h_kv: int, n: int, t: int, d: int):
    rng = rng_for(h, h_kv, n, t, d)
    q = rng.standard_normal((h, n, d)).astype(np.float32) * 2.0  # peaked softmaxes, not only flat ones
    k = rng.standard_normal((h_kv, t, d)).astype(np.float32)
    v = rng.standard_normal((h_kv, t, d)).astype(np.float32)
    return q, k, v


def reference(q, k, v, offset):
    return layers.attend_numpy(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), offset)


def assert_close(o, ref, v, what):
    assert o.shape == ref.shape and o.dtype == np.float32, what
    err = np.abs(o - ref).max() if o.size else 0.0
    assert err <= 1e-5 * np.abs(v).max(), f"{what}: error {err:.3g}"


# (h, h_kv, n, t, d, causal offset or None); GQA ratios 1, 3 and 6.
CASES = [
    (9, 3, 1, 130, 64, 129),  # decode
    (12, 2, 1, 4096, 128, 4095),  # decode over a long cache: keys split over units
    (4, 4, 1, 1, 80, 0),  # the first token
    (4, 2, 1, 50, 64, 20),  # one query whose position is not the last key
    (9, 3, 7, 40, 64, 33),  # a few queries after a cached prefix: per-lane causal limits
    (6, 1, 7, 7, 72, None),  # bidirectional; d not a multiple of any vector width
    (12, 2, 300, 300, 64, 0),  # a prefill chunk
    (9, 3, 300, 812, 80, 512),  # a chunk after a cached prefix
    (4, 4, 300, 300, 128, None),  # vision: bidirectional
    (2, 2, 300, 4096, 64, None),  # queries against a long sequence
    (1, 1, 2000, 2000, 80, None),  # one vision head, as Qwen2-VL calls it
]


IDS = [f"h{h}/{h_kv}-n{n}-t{t}-d{d}-{offset}" for h, h_kv, n, t, d, offset in CASES]


@pytest.mark.parametrize("h,h_kv,n,t,d,offset", CASES, ids=IDS)
def test_matches_reference(kernel_path, h, h_kv, n, t, d, offset):
    q, k, v = make_qkv(h, h_kv, n, t, d)
    assert_close(kernels.attention(q, k, v, offset), reference(q, k, v, offset), v, kernel_path)


@pytest.mark.parametrize("h,h_kv,n,t,d,offset", CASES[:9], ids=IDS[:9])
def test_half_precision_cache_is_read_exactly(kernel_path, h, h_kv, n, t, d, offset):
    """fp16 k/v (a half-precision KV cache, any strides) give exactly what their float32
    widening gives: the values are widened exactly and the arithmetic after is the same."""
    q, k, v = make_qkv(h, h_kv, n, t, d)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    np.testing.assert_array_equal(kernels.attention(q, k16, v16, offset),
                                  kernels.attention(q, k16.astype(np.float32), v16.astype(np.float32), offset))
    cache = np.zeros((h_kv, t + 5, d), np.float16)  # a view into a longer cache, as decode reads it
    cache[:, :t] = k16
    np.testing.assert_array_equal(kernels.attention(q, cache[:, :t], v16, offset),
                                  kernels.attention(q, k16, v16, offset))


def test_causal_mask_per_query(kernel_path):
    """Query i sees keys 0..offset+i exactly: later keys, however large, change nothing."""
    q, k, v = make_qkv(3, 1, 40, 60, 64)
    out = kernels.attention(q, k, v, 20)
    k2, v2 = k.copy(), v.copy()
    k2[:, 21:] *= 50.0
    v2[:, 21:] = 1e6
    out2 = kernels.attention(q, k2, v2, 20)
    np.testing.assert_array_equal(out2[:, 0], out[:, 0])  # query 0 sees keys 0..20
    assert np.abs(out2[:, 1:] - out[:, 1:]).max() > 1.0


def test_reads_views_in_place():
    """Strided q (a transposed projection) and k/v (KV-cache views) give the contiguous result;
    the output is an [h, n, d] view of an [n, h, d] array, as the output projection reads it."""
    h, h_kv, n, d, max_len, start = 9, 3, 5, 64, 100, 30
    q, k, v = make_qkv(h, h_kv, n, start + n, d)
    q_view = np.ascontiguousarray(q.transpose(1, 0, 2)).transpose(1, 0, 2)
    cache = np.zeros((2, 2, h_kv, max_len, d), np.float32)
    cache[1, 0, :, : start + n], cache[1, 1, :, : start + n] = k, v
    got = kernels.attention(q_view, cache[1, 0, :, : start + n], cache[1, 1, :, : start + n], start)
    np.testing.assert_array_equal(got, kernels.attention(q, k, v, start))
    assert got.transpose(1, 0, 2).flags.c_contiguous
    as_f64 = kernels.attention(q.astype(np.float64), k, v, start)  # converted
    np.testing.assert_array_equal(as_f64, got)


# n = 64: 2 query blocks of 2 kv heads' 3 query heads each, grouped by kv head on 1 thread,
# one head per unit on 2 (see attention.c), with the same bits.
@pytest.mark.parametrize("n,t", [(1, 3000), (300, 600), (64, 200)])
def test_threads_give_identical_results(kernel_path, n, t):
    q, k, v = make_qkv(6, 2, n, t, 64)
    kernels.set_threads(1)
    one = kernels.attention(q, k, v, t - n)
    kernels.set_threads(2)
    np.testing.assert_array_equal(kernels.attention(q, k, v, t - n), one)


def test_empty_and_bad_shapes():
    q, k, v = make_qkv(4, 2, 3, 5, 32)
    assert kernels.attention(q[:, :0], k, v, 0).shape == (4, 0, 32)
    bad = [(q, k[:1, :, :16], v, 0),  # d differs
           (q, k, v[:, :4], 0),  # k and v differ
           (q[:3], k, v, 0),  # h_kv does not divide h
           (q, k[:, :0], v[:, :0], None),  # no keys
           (q, k, v, -1),  # negative offset
           (q[0], k, v, 0)]  # not 3-D
    for args in bad:
        with pytest.raises(ValueError):
            kernels.attention(*args)
    big = np.zeros((1, 1, kernels.MAX_HEAD_DIM + 8), np.float32)
    with pytest.raises(ValueError):
        kernels.attention(big, big, big, None)


def test_attend_uses_the_kernel_and_falls_back_past_its_head_dim():
    q, k, v = make_qkv(4, 2, 6, 6, 64)
    np.testing.assert_array_equal(layers.attend(q, k, v, 0), kernels.attention(q, k, v, 0))
    q, k, v = make_qkv(2, 1, 3, 3, kernels.MAX_HEAD_DIM + 8)
    np.testing.assert_array_equal(layers.attend(q, k, v, None), layers.attend_numpy(q, k, v, None))
