"""Sampling, stop strings, streaming and the checks on bad generation input."""

import numpy as np
import pytest

import vlm
from vlm.generation import Sampler, SamplingParams
from vlm.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def model(tiny_llm):
    return vlm.load(tiny_llm("llama"), quantize="f32")


LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)


def draws(params: SamplingParams, n: int = 400, history=()) -> np.ndarray:
    s = Sampler(params)
    return np.array([s(LOGITS, list(history)) for _ in range(n)])


def test_greedy_and_top_k_1_pick_argmax():
    assert set(draws(SamplingParams())) == {1}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=0))) == {1}


def test_top_k_limits_the_candidates():
    assert set(draws(SamplingParams(temperature=10.0, top_k=2, seed=0))) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax(LOGITS): p(1)=0.50, p(2)=0.30, ... top_p 0.6 keeps exactly tokens 1 and 2.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=0))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.4, seed=0))) == {1}


def test_min_p_drops_unlikely_tokens():
    # p(2)/p(1) = exp(-0.5) = 0.61; p(0)/p(1) = exp(-2) = 0.14
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.5, seed=0))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.1, seed=0))) >= {0, 1, 2}


def test_temperature_spreads_and_seed_reproduces():
    hot = draws(SamplingParams(temperature=100.0, seed=1))
    assert len(set(hot)) == 5
    assert np.array_equal(hot, draws(SamplingParams(temperature=100.0, seed=1)))
    assert not np.array_equal(hot, draws(SamplingParams(temperature=100.0, seed=2)))


def test_repetition_penalty_discourages_seen_tokens():
    assert set(draws(SamplingParams(repetition_penalty=2.0), n=1, history=[1])) == {2}  # 3.0/2 < 2.5
    # Negative logits are pushed further down, not up.
    s = Sampler(SamplingParams(repetition_penalty=10.0))
    assert s(np.array([-0.5, -0.1], np.float32), [0]) == 1
    assert s(np.array([-0.1, -0.5], np.float32), [0]) == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-3), dict(repetition_penalty=0.0), dict(temperature=float("nan"))])
def test_invalid_sampling_settings(bad, model):
    with pytest.raises(vlm.VlmError, match="invalid sampling setting"):
        model.generate("hi", **bad)


def test_max_new_tokens_and_stats(model):
    r = model.generate("Hello", max_new_tokens=7)  # the tiny model (fixed seed) does not stop early here
    s = r.stats
    assert s.finish_reason == "length" and len(r.tokens) == s.generated_tokens == 7
    assert s.decode_steps == 6  # the first token comes from the prefill's logits
    assert s.prompt_tokens == model.prepare("Hello").ids.size and s.cached_tokens == 0
    assert s.ttft_s > 0 and s.prefill_tps > 0 and s.decode_tps > 0 and s.peak_memory_mb > 0
    with pytest.raises(vlm.VlmError):
        model.generate("Hello", max_new_tokens=0)


def test_stops_on_eos(model):
    # Make EOS the best token everywhere by forcing a sampler decision through the head bias.
    eos = next(iter(model.tokenizer.eos_ids))
    head = model.decoder.lm_head
    saved = head.bias
    head.bias = np.zeros(model.decoder.config.vocab_size, np.float32)
    head.bias[eos] = 1e4
    try:
        r = model.generate("Hello", max_new_tokens=10)
    finally:
        head.bias = saved
    assert r.tokens == [] and r.stats.finish_reason == "stop"


def test_stop_strings_cut_the_text(model):
    full = model.generate("Tell me", max_new_tokens=24, temperature=1.0, seed=3)
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = model.generate("Tell me", max_new_tokens=24, temperature=1.0, seed=3, stop=[stop])
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.stats.finish_reason == "stop"
    streamed = "".join(model.generate("Tell me", max_new_tokens=24, temperature=1.0, seed=3, stop=[stop], stream=True))
    assert streamed == cut.text


def test_streaming_equals_the_full_text(model):
    stream = model.generate("Hello", max_new_tokens=16, temperature=0.8, seed=5, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.stats.generated_tokens == len(stream.result.tokens)
    assert stream.result.text == model.generate("Hello", max_new_tokens=16, temperature=0.8, seed=5).text


def test_stream_never_splits_a_utf8_character(model):
    tok = model.tokenizer
    # Token ids of the single bytes of "é👍": byte-level vocabularies have one token per byte.
    byte_ids = {b: i for i in range(tok.vocab_size) if len(bs := tok.token_bytes(i)) == 1 for b in bs}
    ids = [byte_ids[b] for b in "é👍x".encode()]
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert pieces == ["", "é", "", "", "", "👍", "x"]
    assert dec.flush() == "" and dec.text == "é👍x"


def test_stream_holds_back_a_possible_stop_string_prefix(model):
    tok = model.tokenizer
    dec = StreamDecoder(tok, stop_strings=["END"])
    out = [dec.push(i) for i in tok.encode("abc EN")]
    assert "".join(out) == "abc "  # "EN" may begin "END": held back
    assert dec.flush() == "EN"


def test_prompt_longer_than_context(tiny_llm):
    small = vlm.load(tiny_llm("llama"), context=32)
    with pytest.raises(vlm.VlmError, match="context holds 32"):
        small.generate("word " * 100)


def test_kv_cache_precision(tiny_llm):
    assert vlm.load(tiny_llm("llama")).cache.k.dtype == np.float16
    assert vlm.load(tiny_llm("llama"), quantize="f32").cache.k.dtype == np.float32  # exact math stays exact
    assert vlm.load(tiny_llm("llama"), kv_cache="f32").cache.v.dtype == np.float32
    with pytest.raises(vlm.VlmError, match="kv_cache must be one of f16, f32"):
        vlm.load(tiny_llm("llama"), kv_cache="q8")


def test_generation_stops_when_the_context_is_full(tiny_llm):
    small = vlm.load(tiny_llm("llama"), context=64)
    r = small.generate("Hello", max_new_tokens=500)
    # The last token is sampled from the logits at cache slot 63: the prompt and the reply fill
    # the 64 slots plus that one token, which is never fed back.
    assert r.stats.finish_reason == "length"
    assert r.stats.prompt_tokens + len(r.tokens) == 65


def test_bad_prompts(model):
    for bad in ([], 3.5):
        with pytest.raises(vlm.VlmError):
            model.generate(bad)
    vocab = model.decoder.config.vocab_size
    for ids in ([-1], [1, vocab], [10**9], [2**63], [1, 2**64]):  # past int64 too: no OverflowError
        with pytest.raises(vlm.VlmError, match=f"token id out of range 0..{vocab - 1}"):
            model.generate(ids)
    with pytest.raises(vlm.VlmError, match="no vision encoder"):
        model.generate("what is this?", images=[np.zeros((4, 4, 3), np.uint8)])


def test_unknown_options_are_errors_not_ignored(model, tiny_smolvlm):
    with pytest.raises(vlm.VlmError, match="unknown option 'temprature'"):
        model.generate("hi", temprature=0.5)
    vision = vlm.load(tiny_smolvlm)
    with pytest.raises(vlm.VlmError, match="unknown option 'max_image_tokens'; this model's image options: max_tiles"):
        vision.generate("hi", images=[np.zeros((8, 8, 3), np.uint8)], max_image_tokens=4)
    assert vision.generate("hi", images=[np.zeros((8, 8, 3), np.uint8)], max_tiles=2, max_new_tokens=2).tokens


@pytest.mark.parametrize("quantize", ["f32", "q4"])  # numpy's path, and the kernels' fused batched step
def test_generate_batch_equals_generate_alone(tiny_llm, quantize):
    """Sequences decoded together in batched steps get the tokens each gets alone, greedy or
    seeded, and each finishes on its own (different lengths, a stop string, EOS)."""
    model = vlm.load(tiny_llm("llama"), quantize=quantize)
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog and", "1 2 3", "Why?", "a b c d e f"]
    for settings in (dict(max_new_tokens=9), dict(max_new_tokens=7, temperature=0.8, top_k=20, seed=3),
                     dict(max_new_tokens=12, stop=["e"])):
        alone = [model.generate(p, **settings) for p in prompts]
        together = model.generate_batch(prompts, **settings)
        for a, b in zip(alone, together, strict=True):
            assert (b.tokens, b.text, b.stats.finish_reason) == (a.tokens, a.text, a.stats.finish_reason)
            assert b.stats.prompt_tokens == a.stats.prompt_tokens and b.stats.generated_tokens == len(b.tokens)
    assert model.generate_batch([]) == []
    with pytest.raises(vlm.VlmError, match="image lists"):
        model.generate_batch(["a", "b"], images=[None])


def test_generate_batch_on_the_real_model_gives_each_prompt_its_greedy_answer(smollm2_gguf):
    """SmolLM2 Q4_1, 8 prompts decoded together: the batched step's rows are bit-identical to
    single steps (int8 products sum in integers; the 8-bit head's float tiles are "solo"), so
    greedy answers are the ones each prompt gets alone."""
    model = vlm.load(smollm2_gguf, context=256)
    prompts = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "What is 2 + 2?",
               "Who wrote Hamlet?", "A word that rhymes with cat?", "Describe the sun.", "Say hello in Spanish."]
    together = model.generate_batch(prompts, max_new_tokens=12)
    for prompt, got in zip(prompts, together, strict=True):
        assert got.tokens == model.generate(prompt, max_new_tokens=12, session=model.new_session()).tokens
