"""Prefix reuse on the default path (4-bit weights, float16 cache, fused decode step): the
next-token logits after reusing a cached conversation equal those of a fresh prefill, for
every family, with and without images. Every test builds its own models: no state carries
over from another test, so each holds when run alone."""

import numpy as np
import pytest
from hf_ref import FAMILIES, VISION, image, user

import vlm
from vlm.session import PromptInputs


def next_logits(model: vlm.Model, prompt, images=()) -> tuple[np.ndarray, int]:
    """The next-token logits `generate` starts from, and how many positions came from the cache.

    """
    return model.session.prefill(model.prepare(prompt, list(images)))


def default_model(path) -> vlm.Model:
    model = vlm.load(path, quantize="q4")
    assert model.cache.k.dtype == np.float16 and model.decoder.decode_plan() is not None
    return model


# Measured max |reused - fresh| / max |fresh|: 0 (bit-identical) to 2.5e-7 (float summation
# order); a cache row from another image, or one off by a position, moves the logits by > 1e-2.
def assert_same_logits(reused: np.ndarray, fresh: np.ndarray) -> None:
    assert np.abs(reused - fresh).max() <= 1e-5 * np.abs(fresh).max()


@pytest.mark.parametrize("family,n_images", [(f, 0) for f in FAMILIES] + [(f, 1) for f in VISION])
def test_second_turn_reuses_the_first_and_equals_fresh_prefill(family, n_images, tiny_model_dir):
    """Turn two reuses turn one (its prompt prefilled, its reply written by the fused decode
    step) and gives the logits a fresh model computes for the whole conversation."""
    path = tiny_model_dir(family)
    images = [image(1)] * n_images
    model = default_model(path)
    first = [user("Describe it, please.", n_images)]
    reply = model.generate(first, images=images, max_new_tokens=12)
    assert reply.stats.decode_steps >= 4
    conversation = first + [{"role": "assistant", "content": reply.text}, user("Why?")]
    reused, cached = next_logits(model, conversation, images)
    assert cached >= reply.stats.prompt_tokens  # all of turn one came from the cache
    fresh_model = default_model(path)
    fresh, none = next_logits(fresh_model, conversation, images)
    assert none == 0
    assert_same_logits(reused, fresh)
    # The reused rows (the prompt's, and the reply's as far as its text tokenizes back to the
    # same ids: those written by the decode step) are the rows a fresh prefill writes.
    np.testing.assert_array_equal(model.cache.k[0, :, :cached], fresh_model.cache.k[0, :, :cached])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_prompt_is_computed_bit_for_bit_alike_whatever_chunks_it_is_prefilled_in(family, tiny_model_dir):
    """A prompt's logits and cache rows do not depend on how much of it came from the cache or
    on the chunk size: a server slot that reuses a prefix answers as a fresh one does."""
    path = tiny_model_dir(family)
    ids = np.random.default_rng(0).integers(3, 200, 40)
    fresh_model = default_model(path)
    fresh, _ = fresh_model.session.prefill(PromptInputs.from_ids(ids))
    for chunk in (256, 5):
        model = vlm.load(path, quantize="q4", prefill_chunk=chunk)
        for tail in (1, 2, 3, 7, 15, 16, 17, 33):
            model.session.prefill(PromptInputs.from_ids(np.r_[ids[:-tail], 2, 1]))  # another ending
            logits, cached = model.session.prefill(PromptInputs.from_ids(ids))
            assert cached == min(ids.size - tail, ids.size - 2)
            np.testing.assert_array_equal(logits, fresh, err_msg=f"chunk {chunk}, tail {tail}")
            np.testing.assert_array_equal(model.cache.k[:, :, :ids.size], fresh_model.cache.k[:, :, :ids.size])


@pytest.mark.parametrize("family", VISION)
def test_a_new_image_in_the_same_place_is_not_taken_from_the_cache(family, tiny_model_dir):
    """Same text, same image size, other pixels: the cache must stop before the image tokens
    (they are keyed by the image's digest, not by the placeholder token)."""
    path = tiny_model_dir(family)
    model = default_model(path)
    prompt = [user("What is this?", 1)]
    model.generate(prompt, images=[image(1)], max_new_tokens=2)
    first_image_row = int(model.prepare(prompt, [image(2)]).image_rows[0])
    reused, cached = next_logits(model, prompt, [image(2)])
    assert cached <= first_image_row
    fresh, _ = next_logits(default_model(path), prompt, [image(2)])
    assert_same_logits(reused, fresh)
    again = model.generate(prompt, images=[image(1)], max_new_tokens=2)  # through the public API too
    assert again.stats.cached_tokens <= first_image_row


@pytest.mark.parametrize("family", VISION)
def test_chat_with_images_equals_fresh_generation(family, tiny_model_dir):
    """vlm.Chat over three turns (two images), then the same conversation on a fresh model."""
    path = tiny_model_dir(family)
    chat = vlm.Chat(default_model(path), max_new_tokens=6)
    chat.send("Describe it.", images=[image(1)])
    chat.send("And this one?", images=[image(2, (60, 120))])
    third = chat.send("Compare them.")
    assert third.stats.images_encoded == 0 and third.stats.cached_tokens > 0
    reused, _ = next_logits(chat.model, chat.messages()[:-1], [image(1), image(2, (60, 120))])
    fresh, _ = next_logits(default_model(path), chat.messages()[:-1], [image(1), image(2, (60, 120))])
    assert_same_logits(reused, fresh)
