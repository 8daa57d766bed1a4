"""Native kernels against the numpy reference (`QuantizedWeight.dequantize()` / `HalfWeight`).

Tolerances (per output element, W the dequantized matrix):
- float mode: |y - x @ W.T| <= 1e-5 * (|x| @ M.T), where M bounds the magnitude of what the
  kernel sums: |W|, or |d| q + |m| for asymmetric 4-bit (it adds d * sum(q x) and m * sum(x)).
- int8 activations ("int8" mode; "w4a8" for 4-bit weights): x is rounded per run of 32 to
  d * q with d = max|x| / 127, so
  |y - x @ W.T| <= sum over runs of d / 2 * sum(|W|) (plus the float bound above); and against
  a numpy emulation of the same rounding the result must agree to the float bound.
Float sums are not required to be bit-exact across paths or thread counts, but one panel is
always computed by one thread, so threads 1 and 2 give identical bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from vlm import kernels
from vlm.models.layers import Linear
from vlm.quant import HalfWeight, QuantizedWeight, quantize, unpack_nibbles

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="native kernels not built")

QUANT_KINDS = ["q4_asym", "q4_sym", "iq4_nl", "q8", "q8_asym"]
GROUPS = [32, 64, 128]
# 8-bit weights also take scales per 16 values (GGUF Q6_K's)
KIND_GROUPS = [(kind, group) for kind in QUANT_KINDS for group in GROUPS] + [("q8", 16), ("q8_asym", 16)]
NS = [1, 3, 17, 64, 300]
FLOAT_TOL = 1e-5


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_quant(rows: int, cols: int, kind: str, group: int) -> QuantizedWeight:
    rng = rng_for(rows, cols, kind, group)
    if kind == "iq4_nl":  # as a GGUF file holds it: any indices, fp16 scales of either sign
        scales = rng.uniform(2e-4, 6e-4, (rows, cols // group)) * rng.choice([-1, 1], (rows, cols // group))
        return QuantizedWeight(4, group, True, rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                               scales.astype(np.float16), codebook=True)
    if kind == "q8" and group == 16:  # as GGUF Q6_K transcodes: q in -32..31, signed scales
        scales = rng.uniform(1e-3, 3e-3, (rows, cols // 16)) * rng.choice([-1, 1], (rows, cols // 16))
        return QuantizedWeight(8, 16, True, rng.integers(-32, 32, (rows, cols), dtype=np.int8),
                               scales.astype(np.float16))
    if kind == "q8_asym":  # as GGUF Q5_1 / Q5_K transcode: q in 0..31, a scale and a min per group
        shape = (rows, cols // group)
        return QuantizedWeight(8, group, False, rng.integers(0, 32, (rows, cols), dtype=np.int8),
                               rng.uniform(2e-3, 4e-3, shape).astype(np.float16),
                               rng.uniform(-0.06, -0.03, shape).astype(np.float16))
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    return quantize(w, 8 if kind == "q8" else 4, group, kind != "q4_asym")


def magnitude(qw: QuantizedWeight) -> np.ndarray:
    """Elementwise bound on the terms the kernels add up (see the module docstring)."""
    if not qw.symmetric:
        rows, cols = qw.shape
        q = (unpack_nibbles(qw.qweight) if qw.bits == 4 else np.abs(qw.qweight)).astype(np.float64)
        q = q.reshape(rows, -1, qw.group_size)
        d = np.abs(qw.scales.astype(np.float64))[..., None]
        m = np.abs(qw.mins.astype(np.float64))[..., None]
        return (d * q + m).reshape(rows, cols)
    return np.abs(qw.dequantize().astype(np.float64))


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """numpy emulation of the kernels' int8 rounding, returned dequantized (float64)."""
    runs = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(runs).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(runs * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def run_step_bound(x: np.ndarray, w_abs: np.ndarray) -> np.ndarray:
    """sum over runs of (d / 2) * sum |W| over the run: the int8 rounding error bound."""
    runs = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32)
    half_step = runs.max(axis=-1) / 127 / 2  # [n, runs]
    w_runs = w_abs.reshape(w_abs.shape[0], -1, 32).sum(axis=-1)  # [rows, runs]
    return half_step @ w_runs.T


def activations(n: int, cols: int) -> np.ndarray:
    x = rng_for(n, cols).standard_normal((n, cols)).astype(np.float32)
    x[:, 5] *= 20.0  # an outlier feature, as real activations have
    return x


def assert_within(y: np.ndarray, ref: np.ndarray, bound: np.ndarray, what: str) -> None:
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


SHAPES = [(37, 256), (16, 128), (64, 384), (1, 128)]


@pytest.mark.parametrize(("kind", "group"), KIND_GROUPS)
def test_quantized_float_mode(kernel_path, kind, group):
    kernels.set_mode("float")
    for rows, cols in SHAPES:
        qw = make_quant(rows, cols, kind, group)
        handle = kernels.prepare(qw)
        w = qw.dequantize().astype(np.float64)
        mag = magnitude(qw)
        for n in NS:
            x = activations(n, cols)
            y = kernels.linear(x, handle)
            assert y.shape == (n, rows) and y.dtype == np.float32
            bound = FLOAT_TOL * (np.abs(x.astype(np.float64)) @ mag.T) + 1e-30
            assert_within(y, x.astype(np.float64) @ w.T, bound, f"{qw.kind} g{group} {rows}x{cols} n={n}")


@pytest.mark.parametrize(("kind", "group"), KIND_GROUPS)
def test_quantized_int8_mode(kernel_path, kind, group):
    kernels.set_mode("int8")
    for rows, cols in SHAPES:
        qw = make_quant(rows, cols, kind, group)
        handle = kernels.prepare(qw)
        w = qw.dequantize().astype(np.float64)
        mag = magnitude(qw)
        for n in NS:
            x = activations(n, cols)
            y = kernels.linear(x, handle)
            what = f"{qw.kind} g{group} {rows}x{cols} n={n}"
            xq = quantize_activations(x)
            float_bound = FLOAT_TOL * (np.abs(xq) @ mag.T) + 1e-30
            assert_within(y, xq @ w.T, float_bound, what + " vs emulated int8")
            bound = run_step_bound(x, np.abs(w)) * (1 + 1e-4) + FLOAT_TOL * (np.abs(x.astype(np.float64)) @ mag.T)
            assert_within(y, x.astype(np.float64) @ w.T, bound, what + " vs exact")


@pytest.mark.parametrize("largest", [16, 31, 32, 127, 128])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_8bit_products_at_the_int16_limits(kernel_path, largest, group):
    """8-bit weights all of one magnitude (Q5_0's 16, Q6_K's 32, Q8_0's 127 and -128; 31 for
    the asymmetric Q5_1 / Q5_K) times activations that all round to 127: every product is as
    large as it can be, so a path whose int16 sums (pmaddubsw pairs, the AVX2 sign trick)
    could saturate gives a wrong result here."""
    kernels.set_mode("int8")
    rows, cols = 24, 256
    sign = np.where(np.arange(rows) % 3 == 0, -1, 1)[:, None] if largest < 128 else -1  # +128 is no int8
    q = np.broadcast_to(sign * largest, (rows, cols)).astype(np.int8)
    scales = np.full((rows, cols // group), 1 / 64, np.float16)
    weights = [QuantizedWeight(8, group, True, q, scales)]
    if largest == 31:
        weights.append(QuantizedWeight(8, group, False, np.abs(q), scales, np.full_like(scales, -0.25)))
    x = np.ones((5, cols), np.float32)
    for qw in weights:
        w = qw.dequantize().astype(np.float64)
        y = kernels.linear(x, kernels.prepare(qw))
        bound = FLOAT_TOL * (np.abs(x.astype(np.float64)) @ magnitude(qw).T)
        assert_within(y, x.astype(np.float64) @ w.T, bound, f"{qw.kind} g{group} |q| = {largest}")


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_weights(kernel_path, kind):
    for rows, cols in [(37, 100), (16, 128), (5, 3)]:
        w = rng_for(rows, cols, kind).standard_normal((rows, cols)).astype(np.float32)
        hw = HalfWeight(w.astype(np.float16)) if kind == "f16" else \
            HalfWeight((w.view(np.uint32) >> 16).astype(np.uint16), bf16=True)
        handle = kernels.prepare(hw)
        ref_w = hw.dequantize().astype(np.float64)
        for n in NS:
            x = rng_for(n, cols).standard_normal((n, cols)).astype(np.float32)
            bound = FLOAT_TOL * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T) + 1e-30
            assert_within(kernels.linear(x, handle), x.astype(np.float64) @ ref_w.T, bound, f"{kind} n={n}")


def test_w4a8_mode_picks_per_weight():
    """w4a8: 4-bit weights get int8 activations, 8-bit weights float ones."""
    x = activations(5, 256)
    for kind in QUANT_KINDS:
        handle = kernels.prepare(make_quant(33, 256, kind, 32))
        out = {}
        for mode in kernels.MODES:
            kernels.set_mode(mode)
            out[mode] = kernels.linear(x, handle)
        np.testing.assert_array_equal(out["w4a8"], out["float" if kind.startswith("q8") else "int8"])
        assert not np.array_equal(out["int8"], out["float"])
    kernels.set_mode("w4a8")


@pytest.mark.parametrize("mode", kernels.MODES)
def test_threads_give_identical_results(kernel_path, mode):
    kernels.set_mode(mode)
    for kind in QUANT_KINDS:
        qw = make_quant(1000, 256, kind, 64)  # enough panels for several units
        handle = kernels.prepare(qw)
        for n in (1, 3, 64):
            x = activations(n, 256)
            kernels.set_threads(1)
            one = kernels.linear(x, handle)
            kernels.set_threads(2)
            two = kernels.linear(x, handle)
            np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("mode", kernels.MODES)
def test_rows_of_a_small_batch_equal_their_own_products(kernel_path, mode):
    """Up to SOLO_TOKENS rows, each row's sums run as when it is alone: bit-identical rows
    (what makes a batched decode step give each sequence the tokens of its own)."""
    kernels.set_mode(mode)
    weights = [make_quant(40, 256, kind, 64) for kind in QUANT_KINDS]
    w = rng_for("half").standard_normal((40, 250)).astype(np.float32)
    weights += [HalfWeight(w.astype(np.float16)), HalfWeight((w.view(np.uint32) >> 16).astype(np.uint16), bf16=True)]
    for w in weights:
        handle = kernels.prepare(w)
        for n in range(2, kernels.SOLO_TOKENS + 1):
            x = activations(n, w.shape[1])
            batched = kernels.linear(x, handle)
            for r in range(n):
                alone = kernels.linear(x[r : r + 1], handle)[0]
                np.testing.assert_array_equal(batched[r], alone, err_msg=f"{w.kind} n={n}")


def test_paths_agree():
    """Every path computes the same int8 rounding, so they differ only by float summation order."""
    qw = make_quant(50, 256, "q4_asym", 32)
    handle = kernels.prepare(qw)
    x = activations(9, 256)
    before = kernels.info()
    outs = []
    for p in kernels.paths():
        kernels.set_path(p)
        outs.append(kernels.linear(x, handle))
    kernels.set_path(before["path"])
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())


def test_linear_shapes_and_conversion():
    qw = make_quant(40, 128, "q4_asym", 32)
    handle = kernels.prepare(qw)
    assert (handle.rows, handle.cols, handle.kind) == (40, 128, "q4_asym") and handle.nbytes > 0
    x = activations(6, 128)
    y = kernels.linear(x, handle)
    np.testing.assert_array_equal(kernels.linear(x[2], handle), y[2])  # 1-D
    np.testing.assert_array_equal(kernels.linear(x.reshape(2, 3, 128), handle), y.reshape(2, 3, 40))
    np.testing.assert_array_equal(kernels.linear(x.astype(np.float64), handle), y)  # converted
    wide = np.zeros((6, 256), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(kernels.linear(wide[:, ::2], handle), y)  # strided
    assert kernels.linear(np.zeros((0, 128), np.float32), handle).shape == (0, 40)
    with pytest.raises(ValueError):
        kernels.linear(np.zeros((2, 64), np.float32), handle)
    with pytest.raises(TypeError):
        kernels.linear(x, qw)


@pytest.mark.parametrize("mode", kernels.MODES)
def test_products_of_one_x_equal_their_own(kernel_path, mode):
    """linears(x, [...]) shares x's prepared activations where the matrices agree (same group:
    q/k/v, gate/up) and not where they do not (another group, 8-bit, 16-bit): each product
    equals its own linear(x, m) bit for bit."""
    kernels.set_mode(mode)
    half = HalfWeight(rng_for("half").standard_normal((24, 256)).astype(np.float16))
    weights = [make_quant(40, 256, "q4_asym", 32), make_quant(8, 256, "q4_asym", 32),
               make_quant(33, 256, "q8", 64), half]
    handles = [kernels.prepare(w) for w in weights]
    for n in (1, 5, 19):
        x = activations(n, 256)
        for some in (handles[:2], handles[1:], handles):
            got = kernels.linears(x, some)
            assert len(got) == len(some)
            for y, h in zip(got, some, strict=True):
                np.testing.assert_array_equal(y, kernels.linear(x, h), err_msg=f"{mode} n={n} {h.kind}")
    empty = kernels.prepare(HalfWeight(np.zeros((0, 256), np.float16)))  # no rows: an empty product
    assert [y.shape for y in kernels.linears(x, [empty, handles[0]])] == [(19, 0), (19, 40)]
    assert kernels.linear(x, empty).shape == (19, 0)
    with pytest.raises(ValueError):  # not x's features
        kernels.linears(x, [handles[0], kernels.prepare(make_quant(8, 128, "q4_asym", 32))])
    with pytest.raises(TypeError):
        kernels.linears(x, handles + handles[:1])  # more than four
    with pytest.raises(TypeError):
        kernels.linears(x, [])


def test_prepare_declines_what_it_does_not_handle():
    assert kernels.prepare(np.zeros((4, 32), np.float32)) is None
    assert kernels.prepare(HalfWeight(np.zeros((2, 4, 32), np.float16))) is None
    group_16 = QuantizedWeight(4, 16, True, np.zeros((4, 24), np.uint8), np.ones((4, 3), np.float16))
    assert kernels.prepare(group_16) is None  # groups of 16: 8-bit weights only


def test_linear_layer_uses_kernels():
    qw = make_quant(48, 128, "q4_sym", 32)
    bias = np.arange(48, dtype=np.float32)
    layer = Linear(qw, bias)
    assert layer.packed is not None
    x = activations(5, 128)
    ref = x.astype(np.float64) @ qw.dequantize().astype(np.float64).T + bias
    before = kernels.info()["mode"]
    kernels.set_mode("float")
    try:
        np.testing.assert_allclose(layer(x), ref, rtol=1e-4, atol=1e-4)
    finally:
        kernels.set_mode(before)


def test_knobs():
    info = kernels.info()
    assert info["available"] and info["path"] == info["paths"][0] and info["threads"] >= 1
    assert info["mode"] in kernels.MODES
    assert info["paths"][-1] == "portable"
    with pytest.raises(ValueError):
        kernels.set_path("sse9")
    with pytest.raises(ValueError):
        kernels.set_mode("int4")
    kernels.set_threads(1)
    assert kernels.info()["threads"] == 1
    kernels.set_threads(None)
    assert kernels.info()["threads"] == kernels.default_threads()


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VLM_")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})


def test_environment_overrides():
    code = "from vlm import kernels; i = kernels.info(); print(i['path'], i['mode'])"
    out = run_python(code)
    assert out.stdout.split() == [kernels.paths()[0], "w4a8"], out.stderr
    out = run_python(code, VLM_KERNEL="portable", VLM_KERNEL_MODE="float")
    assert out.stdout.split() == ["portable", "float"], out.stderr
    out = run_python("from vlm import kernels; print(kernels.AVAILABLE, kernels.prepare(None))", VLM_NO_KERNELS="1")
    assert out.stdout.split() == ["False", "None"], out.stderr


def test_import_failure_falls_back_with_one_warning():
    code = ("import sys, warnings; warnings.simplefilter('always'); sys.modules['vlm.kernels._native'] = None\n"
            "from vlm import kernels; print(kernels.AVAILABLE, kernels.info()['available'])")
    out = run_python(code)
    assert out.stdout.split() == ["False", "False"], out.stderr
    assert out.stderr.count("native kernels unavailable") == 1, out.stderr


def test_int8_activations_opt_in_for_8bit_weights():
    # W4A8 keeps float activations for 8-bit weights unless the matrix opts in; "float" mode
    # still wins, so exact-math runs stay exact.
    rng = np.random.default_rng(7)
    w = quantize(rng.normal(size=(48, 96)).astype(np.float32), bits=8, group_size=32)
    x = rng.normal(size=(5, 96)).astype(np.float32)
    before = kernels.info()["mode"]
    try:
        kernels.set_mode("int8")
        int8 = kernels.linear(x, kernels.prepare(w))
        kernels.set_mode("w4a8")
        assert np.array_equal(kernels.linear(x, kernels.prepare(w, int8_activations=True)), int8)
        exact = kernels.linear(x, kernels.prepare(w))
        assert not np.array_equal(exact, int8)
        kernels.set_mode("float")
        assert np.array_equal(kernels.linear(x, kernels.prepare(w, int8_activations=True)), exact)
    finally:
        kernels.set_mode(before)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_half_weights_long_batches(kernel_path, kind):
    """Products of more than SOLO_TOKENS rows (prefill, vision towers): several k slices with a
    partial last one, a partial last panel, token tiles with a tail; threads 1 and 2 agree bit
    for bit."""
    rows, cols = 50, 1100  # 4 panels, the last partial; k slices of 512, 512, 76
    w = rng_for(rows, cols, kind, "long").standard_normal((rows, cols)).astype(np.float32)
    hw = HalfWeight(w.astype(np.float16)) if kind == "f16" else \
        HalfWeight((w.view(np.uint32) >> 16).astype(np.uint16), bf16=True)
    handle = kernels.prepare(hw)
    ref_w = hw.dequantize().astype(np.float64)
    for n in (kernels.SOLO_TOKENS + 1, 21, 64):
        x = rng_for(n, cols, "long").standard_normal((n, cols)).astype(np.float32)
        bound = FLOAT_TOL * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T) + 1e-30
        kernels.set_threads(1)
        one = kernels.linear(x, handle)
        assert_within(one, x.astype(np.float64) @ ref_w.T, bound, f"{kind} n={n}")
        kernels.set_threads(2)
        np.testing.assert_array_equal(kernels.linear(x, handle), one)
