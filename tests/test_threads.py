"""One model shared by threads and by interleaved streams: every call gets exactly its solo answer.

The expected outputs come from a model used by one caller at a time. Afterwards the shared model
must still answer single calls as a fresh one does: its cache bookkeeping stayed true.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import vlm

PROMPTS = ["The capital of France is", "Why is the sky blue? Answer in one word."]
STEPS = 16
RUNS = 3


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _solo(path, jobs: list[dict]) -> list[list[int]]:
    model = vlm.load(path)
    out = []
    for job in jobs:
        model.reset()  # each from a clean cache, as a fresh model would
        out.append(model.generate(**job, max_new_tokens=STEPS).tokens)
    return out


def _threads(model: vlm.Model, jobs: list[dict]) -> list[list[list[int]]]:
    """Each job in its own thread, RUNS times in a row, all threads started together."""
    got: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(RUNS):
                got[i].append(model.generate(**jobs[i], max_new_tokens=STEPS).tokens)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got


def _check_threads_then_single(path, jobs: list[dict]) -> None:
    expected = _solo(path, jobs)
    assert expected[0] != expected[1]  # the jobs can be told apart
    model = vlm.load(path)
    got = _threads(model, jobs)
    for runs, want in zip(got, expected, strict=True):
        assert runs == [want] * RUNS
    for job, want in zip(jobs, expected, strict=True):  # the shared model is still right alone
        assert model.generate(**job, max_new_tokens=STEPS).tokens == want


def test_two_threads_on_one_text_model(tiny_llm):
    _check_threads_then_single(tiny_llm("llama"), [{"prompt": p} for p in PROMPTS])


# The tiny random vision model's greedy answer is one token repeated: seeded sampling reads the
# whole distribution, so any wrong logits show.
SAMPLED = {"temperature": 1.0, "seed": 7}


def test_two_threads_on_one_vision_model(tiny_qwen2vl):
    jobs = [{"prompt": "Describe this.", "images": [_image(1, 56, 84)], **SAMPLED},
            {"prompt": "What is here?", "images": [_image(2, 84, 56)], **SAMPLED}]
    _check_threads_then_single(tiny_qwen2vl, jobs)


def _interleave(*streams) -> None:
    """Advance the streams one piece each in turn until all are exhausted."""
    live = [iter(s) for s in streams]
    while live:
        for it in list(live):
            if next(it, None) is None:
                live.remove(it)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_interleaved_streams_in_one_thread(tiny_llm, arch):
    path = tiny_llm(arch)
    expected = _solo(path, [{"prompt": p} for p in PROMPTS])
    model = vlm.load(path)
    a, b = (model.generate(p, max_new_tokens=STEPS, stream=True) for p in PROMPTS)
    _interleave(a, b)
    assert [a.result.tokens, b.result.tokens] == expected
    assert model.generate(PROMPTS[0], max_new_tokens=STEPS).tokens == expected[0]


def test_interleaved_streams_with_images(tiny_qwen2vl):
    jobs = [{"prompt": "Describe this.", "images": [_image(3, 56, 56)], **SAMPLED},
            {"prompt": "Describe this.", "images": [_image(4, 56, 56)], **SAMPLED}]  # same text, other image
    expected = _solo(tiny_qwen2vl, jobs)
    model = vlm.load(tiny_qwen2vl)
    streams = [model.generate(**job, max_new_tokens=STEPS, stream=True) for job in jobs]
    _interleave(*streams)
    assert [s.result.tokens for s in streams] == expected


def test_abandoned_stream_leaves_the_model_right(tiny_llm):
    path = tiny_llm("llama")
    fresh = vlm.load(path).generate(PROMPTS[1], max_new_tokens=STEPS).tokens
    model = vlm.load(path)
    stream = model.generate(PROMPTS[0], max_new_tokens=STEPS, stream=True)
    it = iter(stream)
    next(it), next(it)
    del it, stream  # never exhausted nor closed
    assert model.generate(PROMPTS[1], max_new_tokens=STEPS).tokens == fresh
    stream = model.generate(PROMPTS[0], max_new_tokens=STEPS, stream=True)
    next(iter(stream))
    stream.close()
    assert model.generate(PROMPTS[1], max_new_tokens=STEPS).tokens == fresh


def test_stream_raising_midway_leaves_the_model_right(tiny_llm):
    path = tiny_llm("llama")
    fresh = vlm.load(path).generate(PROMPTS[1], max_new_tokens=STEPS).tokens
    model = vlm.load(path)
    real_step, calls = model.decoder.decode_batch, []

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 4:  # after writing this step's rows
            real_step(*args)
            raise RuntimeError("injected")
        return real_step(*args)

    model.decoder.decode_batch = failing_step
    with pytest.raises(RuntimeError, match="injected"):
        for _ in model.generate(PROMPTS[0], max_new_tokens=STEPS, stream=True):
            pass
    model.decoder.decode_batch = real_step
    assert model.session.length == len(model.session.held())
    assert model.generate(PROMPTS[1], max_new_tokens=STEPS).tokens == fresh


def test_sessions_of_one_model_are_independent(tiny_llm):
    path = tiny_llm("llama")
    expected = _solo(path, [{"prompt": p} for p in PROMPTS])
    model = vlm.load(path)
    mine = model.new_session()
    a = model.generate(PROMPTS[0], max_new_tokens=STEPS, stream=True)
    b = model.generate(PROMPTS[1], max_new_tokens=STEPS, stream=True, session=mine)
    _interleave(a, b)
    assert [a.result.tokens, b.result.tokens] == expected
    again = model.generate(PROMPTS[1] + " Really?", max_new_tokens=4, session=mine)
    assert again.stats.cached_tokens > 0  # the session kept its own prefix
