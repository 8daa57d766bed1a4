"""The C row ops against their numpy references, and the fused decode step against the layer-by-layer path.

`LlamaModel.decode_step` runs one token through every layer in one C call
(`kernels.DecoderPlan`); it calls the very kernels `LlamaModel.forward` calls, in the same
order, so its logits and KV cache must be bit-identical to forward's, on every dispatch
path and activation mode, with Qwen2's biases, tied and untied heads and M-RoPE positions.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest

import vlm
from vlm import kernels
from vlm.formats.reader import read_checkpoint
from vlm.loader import prepare_tensors
from vlm.models import layers
from vlm.models.llama import LlamaModel, TextConfig
from vlm.session import step_together

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="native kernels not built")


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# --- row ops ---------------------------------------------------------------------------------
# float32 arithmetic against float64 references: a few ulp.


@pytest.mark.parametrize("shape", [(1, 576), (37, 64), (3, 5, 72), (300, 100)])
def test_rms_norm(kernel_path, shape):
    rng = rng_for(shape)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    ref = layers.rms_norm_numpy(x.astype(np.float64), w.astype(np.float64), 1e-6)
    np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(1, 1536), (256, 1536), (7, 100)])
def test_swiglu(kernel_path, shape):
    rng = rng_for(shape)
    g = rng.standard_normal(shape).astype(np.float32) * 4
    g.flat[:4] = [-100.0, 100.0, -88.5, 0.0]  # e^-g saturates or underflows
    u = rng.standard_normal(shape).astype(np.float32)
    ref = layers.silu(g.astype(np.float64)) * u
    np.testing.assert_allclose(kernels.swiglu(g, u), ref, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("d", [16, 64, 80, 128])
def test_rotary(kernel_path, d):
    rng = rng_for(d)
    h, n = 5, 9
    x = rng.standard_normal((n, h, d)).astype(np.float32).transpose(1, 0, 2)  # [h, n, d], as projections give it
    angles = rng.standard_normal((n, d // 2)) * 3
    cos = np.cos(np.concatenate([angles, angles], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], -1)).astype(np.float32)
    got = kernels.rotary(x, cos, sin)
    ref = layers.apply_rotary_numpy(x.astype(np.float64), cos, sin)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert got.transpose(1, 0, 2).flags.c_contiguous  # x's memory order is kept
    np.testing.assert_array_equal(layers.apply_rotary(x, cos, sin), got)


def test_layers_use_the_kernels():
    x = rng_for("layers").standard_normal((4, 64)).astype(np.float32)
    norm = layers.RMSNorm(np.ones(64, np.float32), 1e-5)
    np.testing.assert_array_equal(norm(x), kernels.rms_norm(x, norm.weight, 1e-5))


# --- the fused decode step -------------------------------------------------------------------


def layer_by_layer(model: vlm.Model) -> vlm.Model:
    """The model with no fused plan: decode_step runs `forward`."""
    model.decoder.decode_plan = lambda: None
    return model


def run(model: vlm.Model, ids: list[int], steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill ids, then `steps` greedy decode steps: their logits, and the KV cache after."""
    session = model.session
    session.reset()
    logits, _ = session.prefill(model.prepare(ids))
    out = []
    for _ in range(steps):
        logits = session.step(int(np.argmax(logits)))
        out.append(logits)
    end = session.length
    return np.array(out), session.cache.k[:, :, :end].copy(), session.cache.v[:, :, :end].copy()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_llm):
    """llama: untied head, no biases; qwen2: tied head, q/k/v biases."""
    return tiny_llm(request.param)


@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("quantize", ["q4", "q8"])
@pytest.mark.parametrize("kv_cache", ["f16", "f32"])
def test_fused_step_is_bit_identical(kernel_path, tiny, mode, quantize, kv_cache):
    """Including the cache: the C step rounds k and v to float16 exactly as numpy's cast does."""
    kernels.set_mode(mode)
    model = vlm.load(tiny, quantize=quantize, kv_cache=kv_cache)
    assert model.decoder.decode_plan() is not None
    ids = model.tokenize("The quick brown fox jumps over the lazy dog.")
    fused = run(model, ids, 300)  # past 256 keys: the cache split over units
    layered = run(layer_by_layer(vlm.load(tiny, quantize=quantize, kv_cache=kv_cache)), ids, 300)
    for a, b, what in zip(fused, layered, ("logits", "k cache", "v cache"), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=what)


def test_fused_step_threads_give_identical_results(tiny):
    before = kernels.info()["threads"]
    model = vlm.load(tiny, quantize="q4")
    ids = model.tokenize("Why is the sky blue?")
    try:
        kernels.set_threads(1)
        one = run(model, ids, 20)
        kernels.set_threads(2)
        two = run(model, ids, 20)
    finally:
        kernels.set_threads(before)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_step_with_mrope_positions(tiny_llm):
    """Qwen2-VL's M-RoPE: cos/sin come from `rope` for [3, n] positions, unchanged."""
    ckpt = read_checkpoint(tiny_llm("qwen2"))
    _, text, _ = prepare_tensors(ckpt, "q4", None, 32)
    config = dataclasses.replace(TextConfig.from_dict(ckpt.config), mrope_section=[2, 3, 3])
    decoder = LlamaModel(config, text)
    assert decoder.decode_plan() is not None
    x = decoder.embed_tokens(np.arange(10, 16))
    positions = np.array([np.arange(6), np.arange(6) // 2, np.arange(6) % 3 + 7])
    results = []
    for fused in (True, False):
        cache = decoder.new_cache(64)
        decoder.forward(x[:5], positions[:, :5], cache, 0)
        step = decoder.decode_step if fused else decoder.forward
        results.append((step(x[5:], positions[:, 5:], cache, 5), cache.k[:, :, :6].copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    flat = decoder.forward(x[5:], np.array([5]), decoder.new_cache(64), 0)  # M-RoPE positions did matter
    assert not np.array_equal(flat, results[0][0])


def batched_run(model: vlm.Model, prompts: list[list[int]], steps: int) -> list[np.ndarray]:
    """Each prompt in a session of its own, then `steps` greedy steps of all of them in one
    batched step each (`step_together`): each sequence's logits."""
    sessions = [model.new_session() for _ in prompts]
    logits = np.array([s.prefill(model.prepare(ids))[0] for s, ids in zip(sessions, prompts, strict=True)])
    out = []
    for _ in range(steps):
        logits = step_together(sessions, np.argmax(logits, axis=-1).tolist())
        out.append(logits)
    return list(np.array(out).transpose(1, 0, 2))


@pytest.mark.parametrize("mode", kernels.MODES)
@pytest.mark.parametrize("quantize", ["q4", "q4_sym", "q8"])
def test_batched_step_rows_equal_their_own_steps(kernel_path, tiny, mode, quantize):
    """Sequences of different lengths decoded together get the logits each gets alone, bit for bit."""
    kernels.set_mode(mode)
    model = vlm.load(tiny, quantize=quantize)
    texts = ["Hi", "The quick brown fox jumps over the lazy dog.", "Why is the sky blue?", "1 2 3 4 5 6 7 8 9"]
    prompts = [model.tokenize(t) for t in texts]
    together = batched_run(model, prompts, 12)
    for ids, got in zip(prompts, together, strict=True):
        np.testing.assert_array_equal(got, run(model, ids, 12)[0])


def test_batched_step_without_a_plan_runs_each_row(tiny):
    model = layer_by_layer(vlm.load(tiny, quantize="f32"))
    prompts = [model.tokenize(t) for t in ("Hello there", "A")]
    for ids, got in zip(prompts, batched_run(model, prompts, 4), strict=True):
        np.testing.assert_array_equal(got, run(model, ids, 4)[0])


def test_no_plan_without_packed_weights_or_silu(tiny):
    model = vlm.load(tiny, quantize="f32")  # float32 weights stay with numpy's BLAS
    assert model.decoder.decode_plan() is None
    ids = model.tokenize("Hello")
    assert model.generate(ids, max_new_tokens=4).tokens  # decode_step falls back to forward
    ckpt = read_checkpoint(tiny)
    _, text, _ = prepare_tensors(ckpt, "q4", None, 32)
    gelu = LlamaModel(dataclasses.replace(TextConfig.from_dict(ckpt.config), hidden_act="gelu"), text)
    assert gelu.decode_plan() is None


def test_plan_checks_its_inputs(tiny):
    model = vlm.load(tiny, quantize="q4", context=32)
    d, plan = model.decoder, model.decoder.decode_plan()
    c = d.config
    x = np.zeros((1, c.hidden_size), np.float32)
    cos = sin = np.zeros((1, c.head_dim), np.float32)
    k, v = model.cache.k, model.cache.v
    for bad in [(x[:, :-1], cos, sin, [k], [v], [0]), (x, cos[:, :-1], sin, [k], [v], [0]),
                (x, cos, sin, [k], [v], [32]), (x, cos, sin, [k], [v], [-1]), (x, cos, sin, [k, k], [v, v], [0, 1]),
                (x, cos, sin, [k], [v[:, :, :16].copy()], [0]), (x, cos, sin, [k.astype(np.float64)], [v], [0]),
                (x, cos, sin, [k[:1]], [v[:1]], [0]), (x, cos, sin, [], [], [])]:
        with pytest.raises(ValueError):
            plan.step(*bad)
    layer = d.layers[0]
    mats = tuple(lin.packed for lin in layer.linears())
    good = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, mats, (None,) * 7)
    swapped = (good[0], good[1], (mats[1], mats[0], *mats[2:]), good[3])
    with pytest.raises(ValueError):  # q and k swapped
        kernels.DecoderPlan([swapped] * c.num_hidden_layers, d.norm.weight, 1e-6, c.num_attention_heads)
    with pytest.raises(ValueError):  # heads that do not divide q
        kernels.DecoderPlan([good] * c.num_hidden_layers, d.norm.weight, 1e-6, c.num_attention_heads + 1)
