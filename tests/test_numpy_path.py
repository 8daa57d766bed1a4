"""The numpy layers (the path without the C extension, which the README promises always works),
forced on while the extension is built: 4-bit weights dequantized by numpy, numpy RMSNorm,
attention and rotary, for every family, against transformers with the same weights."""

import numpy as np
import pytest
from hf_ref import FAMILIES, numpy_layers, prompt_for, reference_logits, rel_error

import vlm
from vlm.models import layers
from vlm.quant import QuantizedWeight

pytestmark = pytest.mark.torch


@pytest.fixture
def numpy_calls(monkeypatch):
    """Counts of the numpy RMSNorm and of numpy matmuls with quantized weights as they run."""
    calls = {"rms_norm": 0, "quantized_linear": 0}
    rms_norm, linear = layers.rms_norm_numpy, layers.Linear.__call__

    def counted_rms_norm(*args):
        calls["rms_norm"] += 1
        return rms_norm(*args)

    def counted_linear(self, x):
        if self.packed is None and isinstance(self.weight, QuantizedWeight):
            calls["quantized_linear"] += 1
        return linear(self, x)

    monkeypatch.setattr(layers, "rms_norm_numpy", counted_rms_norm)
    monkeypatch.setattr(layers.Linear, "__call__", counted_linear)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_layers_match_transformers(family, tiny_model_dir, transformers_q4, numpy_calls):
    path = tiny_model_dir(family)
    prompt, images = prompt_for(family)
    with numpy_layers():
        model = vlm.load(path, quantize="q4", kv_cache="f32")
        ids = model.prepare(prompt, images).ids.tolist()
        ours = model.logits(prompt, images)
    assert model.decoder.decode_plan() is None
    assert numpy_calls["rms_norm"] > 0 and numpy_calls["quantized_linear"] >= 7 * model.decoder.config.num_hidden_layers
    theirs = reference_logits(transformers_q4(family), path, ids, images)
    # Float math on both sides, same weights: measured 5e-7 .. 1.0e-6 across the four families.
    assert rel_error(ours, theirs) <= 1e-5
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
