"""Every vision family through the shared machinery: 4-bit decoder + chosen vision precision
within a stated bound of float, `vlm convert` round trips, multi-turn image chats."""

import numpy as np
import pytest
from hf_ref import causal_lm_name
from PIL import Image

import vlm
from vlm.convert import convert
from vlm.formats.reader import read_checkpoint

FAMILIES = ["tiny_qwen2vl", "tiny_qwen2_5_vl", "tiny_smolvlm"]


def image(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def messages(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return request.getfixturevalue(request.param)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("vision_bits,vision_bound", [(16, 2e-3), (8, 5e-2)])
def test_converted_vlm_stays_within_bound_of_float(tiny, tmp_path, vision_bits, vision_bound):
    report = convert(tiny, tmp_path / "q4", bits=4, vision_bits=vision_bits)
    assert report.output_bytes < report.source_bytes
    f32 = vlm.load(tiny, quantize="f32")
    q = vlm.load(tmp_path / "q4")
    assert q.info["format"] == "vlm" and q.family is not None
    img = image(0)
    pf, pq = f32.preprocess(img), q.preprocess(img)
    assert np.array_equal(pf.pixels, pq.pixels)
    # The vision tower alone: f16 storage is near exact; 8-bit weights (and the kernels' 8-bit
    # activations) cost a few percent.
    assert rel(q.family.encode([pq])[0], f32.family.encode([pf])[0]) < vision_bound
    # The whole model: random tiny weights have no structure, so 4-bit decoder error is large
    # in relative terms; the bound guards against breakage (a wrong layout gives ~1). Measured
    # 0.255 (qwen2_vl) and 0.278 (idefics3) for both vision precisions.
    lf = f32.logits(messages("What is in the picture?"), images=[img])
    lq = q.logits(messages("What is in the picture?"), images=[img])
    assert lq.shape == lf.shape and rel(lq, lf) < 0.33
    # The file holds what the float weights round to on the asymmetric 4-bit grid, checked from
    # the float weights alone: within half a step of each group's (max - min) / 15, and off by a
    # quarter step on average, as rounding to nearest is (truncating would average half a step).
    stored = read_checkpoint(tmp_path / "q4").tensors
    checked = 0
    for hf_name, w in read_checkpoint(tiny).tensors.items():
        name = causal_lm_name(hf_name)
        if not name.endswith("mlp.down_proj.weight") or name not in stored:
            continue
        checked += 1
        groups = np.asarray(w, np.float32).reshape(w.shape[0], -1, 32)
        step = (groups.max(-1) - groups.min(-1))[..., None] / 15
        err = np.abs(stored[name].dequantize().reshape(groups.shape) - groups)
        assert (err <= 0.5 * step * 1.01 + 1e-3 * np.abs(groups).max()).all(), name  # + fp16 scale/min
        assert 0.2 < float((err / step).mean()) < 0.3, name
    assert checked == 2  # both layers
    # Converted == quantized on load, bit for bit: the file format loses nothing.
    on_load = vlm.load(tiny, quantize="q4", vision_quantize={16: "f16", 8: "q8"}[vision_bits])
    assert np.array_equal(on_load.logits(messages("What is in the picture?"), images=[img]), lq)


def test_multi_turn_with_images_reuses_the_cache(tiny):
    model = vlm.load(tiny, quantize="f32")
    chat = vlm.Chat(model, max_new_tokens=6)
    first = chat.send("Describe it.", images=[image(1)])
    assert first.stats.images_encoded == 1
    second = chat.send("And this one?", images=[image(2, (60, 120))])
    assert second.stats.images == 2 and second.stats.images_encoded == 1  # the first image is not re-encoded
    assert second.stats.cached_tokens > first.stats.prompt_tokens // 2
    third = chat.send("Compare them.")
    assert third.stats.images_encoded == 0 and third.stats.cached_tokens > second.stats.prompt_tokens // 2
    # The same conversation prefilled from scratch gives the same answer.
    fresh = vlm.load(tiny, quantize="f32")
    again = fresh.generate(chat.messages()[:-1], images=[image(1), image(2, (60, 120))], max_new_tokens=6)
    assert again.stats.cached_tokens == 0 and again.tokens == third.tokens


def test_image_count_must_match_the_image_parts(tiny):
    model = vlm.load(tiny)
    with pytest.raises(vlm.VlmError, match="image part"):
        model.generate(messages("Two?", n_images=2), images=[image(0)])
    with pytest.raises(vlm.VlmError, match="token ids"):
        model.generate([1, 2, 3], images=[image(0)])


def test_vision_q8_quantizes_linear_weights_only():
    from vlm.loader import convert_vision
    from vlm.quant import QuantizedWeight

    rng = np.random.default_rng(0)
    tensors = {"embeddings.position_embedding.weight": rng.standard_normal((64, 32)).astype(np.float32),
               "encoder.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32)).astype(np.float32),
               "encoder.layers.0.layer_norm1.weight": np.ones(32, np.float32)}
    out = convert_vision(tensors, "q8")
    assert isinstance(out["encoder.layers.0.self_attn.q_proj.weight"], QuantizedWeight)
    # an added table, not a matmul: kept exact
    np.testing.assert_array_equal(out["embeddings.position_embedding.weight"],
                                  tensors["embeddings.position_embedding.weight"])
    assert out["encoder.layers.0.layer_norm1.weight"].dtype == np.float32
