"""Config branches that load a model and must match transformers: the `mistral` model type and
the rope scalings (Llama 3, YaRN); an unknown scaling is refused at load."""

import json
import shutil

import numpy as np
import pytest

import vlm

TEXT = "The quick brown fox jumps over the lazy dog. Why is the sky blue? " * 4  # past the original 64


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["mistral", "llama3", "yarn"])
def test_matches_transformers(arch, tiny_llm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tiny_llm(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = vlm.load(path, quantize="f32")
    decoder = model.decoder
    # transformers applied the same scaling: its frequencies and cos/sin scale are ours.
    rotary = hf.model.rotary_emb
    np.testing.assert_allclose(decoder.inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert decoder.rope_scale == pytest.approx(rotary.attention_scaling, rel=1e-9)
    if arch != "mistral":  # the scaling does change the frequencies
        assert not np.allclose(decoder.inv_freq, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))
    ids = model.tokenize(TEXT)
    assert len(ids) > 64
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    got = model.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    expected = out[0, len(ids):].tolist()
    eos = model.tokenizer.eos_ids
    n = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert model.generate(ids, max_new_tokens=12).tokens == expected[:n]


def test_unknown_rope_scaling_is_refused_at_load(tiny_llm, tmp_path):
    src = tiny_llm("llama")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(vlm.VlmError, match="unsupported rope scaling 'longrope'"):
        vlm.load(tmp_path)
