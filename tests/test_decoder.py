"""The Llama / Qwen2 decoder: parity with transformers, chunked prefill, KV-cache reuse."""

import numpy as np
import pytest

import vlm

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Café 日本語 👍 12345 and some code: def f(x):"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch_dir(request, tiny_llm):
    return request.param, tiny_llm(request.param)


@pytest.mark.torch
def test_logits_and_greedy_match_transformers(arch_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, path = arch_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    model = vlm.load(path, quantize="f32")
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert model.render(messages) == rendered
        ids = hf_tok(rendered, add_special_tokens=False).input_ids
        assert model.tokenize(rendered) == ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = model.logits(messages)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
        expected = out[0, len(ids):].tolist()
        result = model.generate(ids, max_new_tokens=24)
        eos = model.tokenizer.eos_ids
        n = next((i for i, t in enumerate(expected) if t in eos), len(expected))
        assert result.tokens == expected[:n]


def test_chunked_prefill_equals_one_shot(arch_dir):
    _, path = arch_dir
    one = vlm.load(path, quantize="f32", prefill_chunk=4096)
    chunked = vlm.load(path, quantize="f32", prefill_chunk=5)
    ids = one.tokenize(PROMPTS[0] * 3)
    a, b = one.logits(ids), chunked.logits(ids)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert one.generate(ids, max_new_tokens=12).tokens == chunked.generate(ids, max_new_tokens=12).tokens


def test_kv_reuse_across_turns_equals_fresh_prefill(arch_dir):
    _, path = arch_dir
    model = vlm.load(path, quantize="f32")
    first = [{"role": "user", "content": "Hello there!"}]
    r1 = model.generate(first, max_new_tokens=8)
    second = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Why is the sky blue?"}]
    r2 = model.generate(second, max_new_tokens=8)
    assert r2.stats.cached_tokens > 0  # the first turn was not prefilled again
    assert r2.stats.cached_tokens < r2.stats.prompt_tokens
    fresh = vlm.load(path, quantize="f32").generate(second, max_new_tokens=8)
    assert fresh.stats.cached_tokens == 0
    assert fresh.tokens == r2.tokens


def test_logits_accept_token_ids_exactly(arch_dir):
    _, path = arch_dir
    model = vlm.load(path, quantize="f32")
    ids = [5, 17, 200, 3]
    assert model.logits(ids).shape == (4, model.decoder.config.vocab_size)
    # The same ids as raw text tokens give the same logits: ids are used exactly as given.
    text = model.detokenize(ids)
    assert model.tokenize(text) == ids
    assert np.array_equal(model.logits(ids), model.logits(text, raw=True))


def test_q4_stays_close_to_float(arch_dir):
    # Random weights have no structure, so only the hidden-state error is meaningful here;
    # the top-1 bound on a real model is in test_smollm2.py.
    _, path = arch_dir
    ids = vlm.load(path).tokenize(PROMPTS[0])
    f = vlm.load(path, quantize="f32").logits(ids)
    # Measured (llama, qwen2): q8 0.016, 0.017; q4 0.237, 0.182 (with the kernels' 8-bit
    # activations and the f16 cache). A wrong scale, min or group layout gives ~1.
    for mode, bound in (("q8", 0.025), ("q4", 0.3)):
        q = vlm.load(path, quantize=mode).logits(ids)
        assert np.abs(q - f).max() / np.abs(f).max() < bound, mode


def test_converted_model_loads_by_mmap_and_matches_on_load_quantization(arch_dir, tmp_path):
    from vlm.convert import convert

    _, path = arch_dir
    report = convert(path, tmp_path / "q4", bits=4, progress=True)
    assert report.output_bytes < report.source_bytes / 3
    assert 0 < max(report.errors.values()) < 0.15
    converted = vlm.load(tmp_path / "q4")
    on_load = vlm.load(path, quantize="q4")
    ids = on_load.tokenize(PROMPTS[1])
    assert np.array_equal(converted.logits(ids), on_load.logits(ids))
    from vlm.formats.reader import read_checkpoint

    w = read_checkpoint(tmp_path / "q4").tensors["model.layers.0.mlp.up_proj.weight"]
    assert isinstance(w.qweight, np.memmap) or isinstance(w.qweight.base, np.memmap)  # mapped, not read
