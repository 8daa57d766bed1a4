"""The float16 KV cache (the default) against an outside reference: numpy's float16 cast.

The fused and layer-by-layer paths share the C rounding (`vlm_float_to_half`, F16C), so
comparing them with each other cannot see a bug in it; every check here compares with numpy.
"""

import numpy as np
import pytest
from hf_ref import numpy_layers

import vlm
from vlm import kernels

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="native kernels not built")


def half_grid_values() -> np.ndarray:
    """float32 values where float16 rounding is easy to get wrong, plus ordinary ones."""
    f16 = np.arange(0, 0x7C00, 97, dtype=np.uint16).view(np.float16)  # every exponent, odd and even mantissas
    lo, hi = f16[:-1].astype(np.float64), f16[1:].astype(np.float64)
    step = (np.nextafter(f16.astype(np.float16), np.float16(np.inf)).astype(np.float64) - f16)[:-1]
    ties = (lo + step / 2).astype(np.float32)  # exactly halfway: to even (f32 holds 12 mantissa bits)
    tiny = 2.0 ** -24  # the smallest float16 subnormal
    subnormal = np.array([k * tiny for k in (0.25, 0.5, 0.75, 1, 1.5, 2.5, 3.5, 1022.5, 1023.5)]
                         + [2.0 ** -14 - tiny / 2, 2.0 ** -14 - tiny / 4], np.float32)
    edges = np.array([65504, 65519, 65519.996, 65520, 65536, 1e5, 3.4e38, np.inf, 0.0, -0.0, 1.0, 2.0 ** -14],
                     np.float32)
    rng = np.random.default_rng(0)
    ordinary = (rng.standard_normal(300) * 10.0 ** rng.uniform(-6, 4, 300)).astype(np.float32)
    core = np.concatenate([ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(np.inf)),
                           subnormal, np.nextafter(subnormal, np.float32(np.inf)), edges, ordinary,
                           hi.astype(np.float32)])
    return np.concatenate([core, -core])


def assert_same_halves(got: np.ndarray, src: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # overflow to inf is one of the cases
        want = src.astype(np.float16)
    wrong = got.view(np.uint16) != want.view(np.uint16)
    assert not wrong.any(), (f"{int(wrong.sum())} of {wrong.size} values differ from numpy's cast, "
                             f"e.g. {src[wrong][:4]} -> {got[wrong][:4]} (numpy: {want[wrong][:4]})")


@pytest.mark.parametrize("d", [1, 3, 8, 15, 16, 17, 31, 64, 69])  # vector widths 8/16 and their tails
def test_store_half_rounds_as_numpy(kernel_path, d):
    """Round to nearest even at every exponent, ties, subnormals, overflow to inf: bit for bit."""
    values = half_grid_values()
    rows = -(-values.size // d)
    src = np.resize(values, (2, rows, d)).astype(np.float32)
    cache = np.full((2, rows + 3, d), np.float16(7), np.float16)  # write into a view of a longer cache
    kernels.store_half(cache[:, 1:rows + 1], src)
    assert_same_halves(cache[:, 1:rows + 1], src)
    assert (cache[:, 0] == 7).all() and (cache[:, rows + 1:] == 7).all()  # nothing written outside the view
    nan = np.full((1, 1, d), np.nan, np.float32)
    out = np.zeros((1, 1, d), np.float16)
    kernels.store_half(out, nan)
    assert np.isnan(out).all()


@pytest.mark.parametrize("n,offset", [(1, 40), (7, 34)])  # a decode step (rows kernel), a prefill chunk (block kernel)
def test_attention_reads_halves_as_numpy_widens_them(kernel_path, n, offset):
    """Attention over float16 k/v against numpy's attention over numpy's widening of them,
    element by element: head 0's values are all subnormal halves, head 1's are normal."""
    from vlm.models.layers import attend_numpy

    rng = np.random.default_rng(1)
    t, d = offset + n, 40  # d: two vectors of 16 and a tail
    q = rng.standard_normal((4, n, d)).astype(np.float32)
    k = rng.standard_normal((2, t, d)).astype(np.float16)
    v = np.stack([rng.integers(1, 1024, (t, d)) * 2.0 ** -24,  # every value a subnormal half
                  rng.standard_normal((t, d))]).astype(np.float16)
    cache_k = np.zeros((2, t + 9, d), np.float16)
    cache_v = np.zeros((2, t + 9, d), np.float16)
    cache_k[:, :t], cache_v[:, :t] = k, v
    got = kernels.attention(q, cache_k[:, :t], cache_v[:, :t], offset)
    want = attend_numpy(q, k.astype(np.float32), v.astype(np.float32), offset)
    # Query heads 0-1 read kv head 0: positive averages of subnormals, compared value by value
    # (a widening that flushes them to zero is off by 100%); heads 2-3 against their largest.
    np.testing.assert_allclose(got[:2], want[:2], rtol=2e-5, atol=0)
    np.testing.assert_allclose(got[2:], want[2:], rtol=0, atol=2e-6 * np.abs(want[2:]).max())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_llm):
    return tiny_llm(request.param)


PROMPT = "The quick brown fox jumps over the lazy dog. Why is the sky blue?"


def test_cache_writes_round_as_numpy(kernel_path, tiny):
    """The default model's cache (prefill stores and the fused decode step's stores) holds
    numpy's float16 of what the float32 cache holds. Layer 0's k/v depend only on the tokens,
    so the f16 and f32 models compute them identically and only the rounding can differ."""
    half = vlm.load(tiny, quantize="q4")
    assert half.cache.k.dtype == np.float16 and half.decoder.decode_plan() is not None
    result = half.generate(PROMPT, max_new_tokens=12)
    assert result.stats.decode_steps >= 4  # rows past the prompt came from the fused step
    n = half.session.length
    full = vlm.load(tiny, quantize="q4", kv_cache="f32")
    full.logits(list(half.session.held()))  # every position prefilled into a float32 cache
    for name in ("k", "v"):
        got = getattr(half.cache, name)[0, :, :n]
        assert_same_halves(got, getattr(full.cache, name)[0, :, :n])


def test_decode_step_reads_the_half_cache_as_numpy(kernel_path, tiny):
    """One fused decode step over a float16 cache against the numpy layers over the same cache:
    numpy widens the halves itself. Float activations so both sides compute the same sums."""
    kernels.set_mode("float")  # the kernel_path fixture restores the mode
    model = vlm.load(tiny, quantize="q4")
    ids = model.tokenize(PROMPT)
    model.logits(ids)
    n = len(ids)
    with numpy_layers():
        reference = vlm.load(tiny, quantize="q4")
        reference.cache.k[...], reference.cache.v[...] = model.cache.k, model.cache.v
        x = reference.decoder.embed_tokens(np.array([ids[-1]]))
        want = reference.decoder.lm_head(reference.decoder.decode_step(x, np.array([n]), reference.cache, n))
    decoder = model.decoder
    got = decoder.lm_head(decoder.decode_step(decoder.embed_tokens(np.array([ids[-1]])), np.array([n]), model.cache, n))
    # measured max |got - want| / max |want|: 5e-7 .. 1.4e-5 (float rounding, and the new row's
    # halves below); reading the halves wrongly or a row off by one moves it by > 1e-2.
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # The new row: float rounding may tip a value to the neighbouring half (1.5% measured).
    new_k, ref_k = model.cache.k[:, :, n].astype(np.float32), reference.cache.k[:, :, n].astype(np.float32)
    np.testing.assert_allclose(new_k, ref_k, rtol=1e-3, atol=1e-7)
