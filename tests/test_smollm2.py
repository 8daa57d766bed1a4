"""The real model: SmolLM2-135M-Instruct Q4_1 GGUF, against transformers and llama.cpp."""

import numpy as np
import pytest

import vlm
from vlm.formats.reader import read_checkpoint
from vlm.loader import build_model, quantize_decoder
from vlm.quant import QuantizedWeight, dequantize

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Explain in two sentences why the sky is blue. Café, 日本語, 👍."}]


@pytest.fixture(scope="module")
def f32(smollm2_gguf):
    return vlm.load(smollm2_gguf, quantize="f32")


@pytest.fixture(scope="module")
def sequence(f32):
    """A chat prompt plus the float model's greedy continuation: realistic positions to score."""
    ids = f32.prepare(MESSAGES).ids.tolist()
    return ids + f32.generate(ids, max_new_tokens=40).tokens


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def test_reads_the_gguf_as_it_is(smollm2_gguf):
    model = vlm.load(smollm2_gguf)
    c = model.decoder.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert c.rope_theta == 100000.0 and abs(c.rms_norm_eps - 1e-5) < 1e-9 and c.tie_word_embeddings
    assert model.decoder.layers[0].mlp.up_proj.kind == "q4_asym"  # Q4_1, not re-quantized
    up = read_checkpoint(smollm2_gguf).tensors["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(up, QuantizedWeight) and up.group_size == 32
    assert model.decoder.embed_tokens.kind == "q8"
    assert model.tokenizer.eos_ids == {2}


@pytest.mark.torch
def test_f32_matches_transformers(smollm2_transformers, f32, sequence):
    import torch

    hf, tok = smollm2_transformers
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert f32.render(MESSAGES) == rendered
    prompt = tok(rendered, add_special_tokens=False).input_ids
    assert sequence[: len(prompt)] == prompt
    with torch.no_grad():
        ref = hf(torch.tensor([sequence])).logits[0].numpy()
    got = f32.logits(sequence)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert sequence[len(prompt):] == [t for t in out if t != 2]


def test_agreement_with_llama_cpp(smollm2_gguf):
    pytest.importorskip("llama_cpp")
    import agreement

    llm = agreement.llama_cpp_model(smollm2_gguf)
    model = vlm.load(smollm2_gguf)
    seqs = agreement.sequences(llm, model, 32)[:3]
    # Scored where llama.cpp generated: the positions that predict its greedy continuation
    # (the prompt's positions are easy and would dilute a regression).
    starts = [model.prepare([{"role": "user", "content": p}]).ids.size - 1 for p in agreement.PROMPTS[:3]]
    ours = [model.logits(s)[a:-1] for s, a in zip(seqs, starts, strict=True)]
    theirs = [agreement.llama_cpp_logits(llm, s)[a:-1] for s, a in zip(seqs, starts, strict=True)]
    assert sum(len(x) for x in ours) >= 80
    # Both quantize activations to 8 bits, each its own way, so near-ties flip. Measured: 0.966
    # (84 of 87 continuation tokens); transformers fp32 agrees with llama.cpp on ~97% too.
    assert agreement.agreement(ours, theirs) >= 0.93


def test_default_4bit_path_stays_close_to_f32(smollm2_gguf, f32, sequence):
    # Same weights and a float32 KV cache; differences come only from the kernels' arithmetic
    # (e.g. 8-bit activations).
    q = vlm.load(smollm2_gguf, kv_cache="f32").logits(sequence)
    a = f32.logits(sequence)
    assert top1(q, a) >= 0.95
    assert np.abs(q - a).max() <= 0.12 * np.abs(a).max()  # measured 0.077 (8-bit activations)


def test_half_precision_kv_cache_stays_close_to_f32(smollm2_gguf, f32, sequence):
    # The default cache is float16; alone, on float32 weights, it moves logits by ~1e-3.
    model = vlm.load(smollm2_gguf, quantize="f32", kv_cache="f16")
    assert model.cache.k.dtype == np.float16 and f32.cache.k.dtype == np.float32
    h, a = model.logits(sequence), f32.logits(sequence)
    assert top1(h, a) >= 0.99
    assert np.abs(h - a).max() <= 5e-3 * np.abs(a).max()  # measured 1.0e-3
    assert vlm.load(smollm2_gguf).cache.k.dtype == np.float16


def test_quantizing_the_float_model(smollm2_gguf, sequence):
    original = read_checkpoint(smollm2_gguf)
    ckpt = read_checkpoint(smollm2_gguf)
    ckpt.tensors = {k: dequantize(w) for k, w in ckpt.tensors.items()}  # the float model transformers sees
    a = build_model(ckpt, "f32").logits(sequence)
    # Asymmetric 4-bit, group 32, lands exactly on Q4_1's grid: the original weights come back.
    requantized = quantize_decoder(ckpt.tensors, "q4")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        assert np.array_equal(requantized[name].dequantize(), original.tensors[name].dequantize())
    assert np.array_equal(build_model(ckpt, "q4").logits(sequence), build_model(original).logits(sequence))
    # 8-bit layers on int8 activations (as llama.cpp runs Q8_0); the f32 cache isolates them.
    q8 = build_model(ckpt, "q8", kv_cache="f32").logits(sequence)
    assert top1(q8, a) >= 0.9  # measured 0.937 (0.96 with float activations)
    assert np.sqrt(np.mean((q8 - a) ** 2)) <= 0.06 * np.sqrt(np.mean(a * a))  # measured 0.049 (0.03)


def test_chat_template_renders_as_llama_cpp(smollm2_gguf, f32):
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = f32.tokenizer.chat_template
    fmt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    conversation = MESSAGES + [{"role": "assistant", "content": "Rayleigh scattering."},
                               {"role": "user", "content": "Und auf Deutsch? ½ ∑ 🙂"}]
    for messages in (MESSAGES, conversation, [{"role": "system", "content": "Be terse."}, *MESSAGES]):
        assert f32.render(messages) == fmt(messages=messages).prompt
