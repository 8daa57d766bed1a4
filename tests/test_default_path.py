"""The path users run by default (4-bit weights, 8-bit activations, float16 KV cache, fused
decode step) against transformers computing with the same weights dequantized, in float32.

The logits are taken at every position: the prompt's from the prefill, then one per token
from the fused decode step. What separates the two sides is the kernels' 8-bit activations
and the float16 cache; each bound below sits above the value measured on this path and well
below what a wrong rounding, rope, bias or cache read gives (errors of 1e-1 and more).
"""

import numpy as np
import pytest
from hf_ref import FAMILIES, prompt_for, reference_logits, rel_error, top1

import vlm

pytestmark = pytest.mark.torch

def default_path_logits(model: vlm.Model, prompt, images: list, steps: int) -> tuple[list[int], np.ndarray]:
    """Token ids and logits at every position: the prompt prefilled, then `steps` greedy tokens
    through the decode step `generate` runs (the fused C step over the float16 cache, at the
    positions the model computes; transformers computes its own)."""
    inputs = model.prepare(prompt, images)
    rows = [model.logits(prompt, images)]
    ids = inputs.ids.tolist()
    assert model.cache.k.dtype == np.float16 and model.decoder.decode_plan() is not None
    for _ in range(steps):
        token = int(rows[-1][-1].argmax())
        ids.append(token)
        rows.append(model.session.step(token)[None])  # generate's own step
    return ids, np.concatenate(rows)


# Measured max |ours - transformers| / max |transformers| over every position (prompt + 16
# decoded), 4-bit weights on load, W4A8, f16 cache:
#   llama 0.023, qwen2 0.018, qwen2_vl 0.015, idefics3 0.020 (top-1 agreement 0.94-0.99).
TINY_BOUND = 0.04


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_default_path_matches_transformers(family, tiny_model_dir, transformers_q4):
    path = tiny_model_dir(family)
    model = vlm.load(path, quantize="q4")  # a checkpoint's default precision as converted: 4-bit
    prompt, images = prompt_for(family)
    ids, ours = default_path_logits(model, prompt, images, steps=16)
    theirs = reference_logits(transformers_q4(family), path, ids, images)
    assert rel_error(ours, theirs) <= TINY_BOUND


@pytest.mark.slow
def test_smollm2_default_path_matches_transformers(smollm2_gguf, smollm2_transformers):
    """The real model as `vlm.load` gives it: Q4_1 weights kept as stored, W4A8, f16 cache.
    transformers reads the same GGUF and dequantizes the same Q4_1 blocks."""
    model = vlm.load(smollm2_gguf)
    hf, _ = smollm2_transformers
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids, ours = default_path_logits(model, messages, [], steps=32)
    theirs = reference_logits(hf, smollm2_gguf, ids, [])
    # measured over 44 prompt + 32 decoded positions: rel 0.060, top-1 agreement 0.972
    assert rel_error(ours, theirs) <= 0.09
    assert top1(ours, theirs) >= 0.93
