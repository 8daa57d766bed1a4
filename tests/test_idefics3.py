"""Idefics3 / SmolVLM family: processor, vision tower and prompt expansion against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.errors import VlmError
from vlm.models.idefics3 import Idefics3Family, Idefics3ImageProcessor
from vlm.models.idefics3.vision import pixel_shuffle, position_ids
from vlm.prompt import TextSegment
from vlm.quant import HalfWeight, quantize


def _rng_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resampling differences would show, unlike on flat colour.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    pixels = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.where((xx // 7 + yy // 5) % 3 == 0, 0, rng.integers(0, 256, (h, w))).astype(np.uint8)
        img = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode == "P":
        img = img.quantize(colors=32)
        img.info["transparency"] = 3
    elif mode != "RGB":
        img = img.convert(mode)
    return img


IMAGES = {
    "wide": (300, 100, "RGB"),
    "tall": (90, 250, "RGB"),
    "odd": (101, 77, "RGB"),
    "square": (128, 128, "RGB"),
    "rgba": (120, 90, "RGBA"),
    "palette": (80, 140, "P"),
    "grey": (150, 60, "L"),
}


@pytest.fixture(scope="module")
def tiny(tiny_smolvlm):
    return tiny_smolvlm


def _family(path: Path, convert=None, **kwargs) -> Idefics3Family:
    from safetensors.numpy import load_file

    config = json.loads((path / "config.json").read_text())
    pre = json.loads((path / "processor_config.json").read_text())
    vision, _ = Idefics3Family.split_tensors(load_file(path / "model.safetensors"))
    if convert is not None:
        vision = {k: convert(v) if k.endswith("proj.weight") or ".fc" in k and k.endswith("weight") else v
                  for k, v in vision.items()}
    return Idefics3Family(config, vision, pre, **kwargs)


@pytest.fixture(scope="module")
def family(tiny):
    return _family(tiny)


@pytest.fixture(scope="module")
def reference(tiny):
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny)
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32).eval()
    return processor, model


def _reference_features(model, pixel_values: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(pixel_values)[None], return_dict=True)
    return torch.cat(list(out.pooler_output)).numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- processor ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_processor_matches_reference(family, reference, name):
    processor, _ = reference
    img = _rng_image(*IMAGES[name])
    ref = processor.image_processor(img, return_row_col_info=True, return_tensors="np")
    ours = family.preprocess(img)
    assert ours.pixels.shape == ref["pixel_values"][0].shape
    assert ours.grid == (ref["rows"][0][0], ref["cols"][0][0])
    assert ours.grid[0] * ours.grid[1] > 0
    np.testing.assert_allclose(ours.pixels, ref["pixel_values"][0], rtol=0, atol=1e-6)
    assert ours.rows == len(ours.pixels) * processor.image_seq_len


def test_unsplit_image_matches_reference(tiny, reference):
    """An image within one tile: no grid, one tile, the single-image prompt form."""
    processor, _ = reference
    pre = json.loads((tiny / "processor_config.json").read_text())
    pre["image_processor"]["size"] = {"longest_edge": 64}
    fam = Idefics3Family(json.loads((tiny / "config.json").read_text()),
                         Idefics3Family.split_tensors(_load(tiny))[0], pre)
    img = _rng_image(50, 40)
    ref = processor.image_processor(img, size={"longest_edge": 64}, return_row_col_info=True, return_tensors="np")
    ours = fam.preprocess(img)
    assert (ours.grid, len(ours.pixels)) == ((0, 0), 1)
    np.testing.assert_allclose(ours.pixels, ref["pixel_values"][0], rtol=0, atol=1e-6)
    text = "User:<image>Hi<end_of_utterance>\nAssistant:"
    assert _expanded(fam, text, [ours]) == _reference_prompt(processor, text, [img], size={"longest_edge": 64})


def _load(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(path / "model.safetensors")


def _expanded(family: Idefics3Family, text: str, images: list) -> str:
    """The text form of the family's image slots, to compare with the reference's prompt string."""
    parts = text.split(family.image_token)
    out = [parts[0]]
    for image, part in zip(images, parts[1:], strict=True):
        out += [p if isinstance(p, str) else family.image_token * p for p in family.image_slot(image)] + [part]
    return "".join(out)


def _reference_prompt(processor, text: str, images: list, **kwargs) -> str:
    _, replacements = processor._process_images([images], return_row_col_info=True, **kwargs)
    return processor.get_text_with_replacements([text], images_replacements=replacements)[0][0]


def test_expanded_prompt_matches_reference(family, reference):
    processor, _ = reference
    imgs = [_rng_image(*IMAGES["wide"]), _rng_image(*IMAGES["tall"])]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}, {"type": "text", "text": " these."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|>User:<image>Compare<image> these.<end_of_utterance>\nAssistant:"
    ours = _expanded(family, text, [family.preprocess(im) for im in imgs])
    assert ours == _reference_prompt(processor, text, imgs)
    ids = processor(text=text, images=imgs)["input_ids"][0]
    assert processor.tokenizer(ours)["input_ids"] == list(ids)
    assert sum(i == family.image_token_id for i in ids) == sum(family.preprocess(im).rows for im in imgs)


def test_prompt_ids_match_reference(loaded, reference):
    """Segments tokenized piece by piece give the reference's ids, the image rows where its image tokens are."""
    processor, _ = reference
    imgs = [_rng_image(*IMAGES["wide"]), _rng_image(*IMAGES["tall"]), _rng_image(50, 40)]
    messages = _messages(3, "Compare these.")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = np.asarray(processor(text=text, images=imgs)["input_ids"][0])
    inputs = loaded.prepare(messages, images=imgs)
    np.testing.assert_array_equal(inputs.ids, ids)
    np.testing.assert_array_equal(inputs.image_rows, np.flatnonzero(ids == loaded.family.image_token_id))


def test_max_tiles_caps_the_grid():
    processor = Idefics3ImageProcessor(192, 64, 4)  # the tiny model's settings
    img = _rng_image(200, 180)  # 3 x 3 tiles + global by default
    full = processor(img)
    assert len(full.pixels) == 10
    capped = processor(img, max_tiles=5)
    assert (capped.grid, len(capped.pixels), capped.rows) == ((2, 2), 5, 20)
    single = processor(img, max_tiles=1)
    assert (single.grid, len(single.pixels)) == ((0, 0), 1)
    assert len({full.digest, capped.digest, single.digest}) == 3
    assert processor(img).digest == full.digest
    assert processor(_rng_image(200, 180, seed=1)).digest != full.digest
    assert Idefics3ImageProcessor(192, 64, 4, max_tiles=5)(img).digest == capped.digest


def test_processor_rejects_bad_input():
    processor = Idefics3ImageProcessor(192, 64, 4)
    with pytest.raises(VlmError):
        processor(np.zeros((4, 4, 3), np.uint8))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(VlmError):
            processor(_rng_image(10, 10), max_tiles=bad)
    with pytest.raises(VlmError):
        Idefics3ImageProcessor(0, 64, 4)
    with pytest.raises(VlmError, match="resample"):
        Idefics3ImageProcessor(192, 64, 4, resample=99)


def test_wrong_placeholder_count_is_an_error(loaded):
    img = _rng_image(10, 10)
    with pytest.raises(VlmError, match="placeholder"):
        loaded.prepare("<image><image>", images=[img], raw=True)  # two of its own, one image's


# --- vision tower ------------------------------------------------------------------------


def test_position_ids_match_reference():
    torch = pytest.importorskip("torch")
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    for image_size, tile in ((512, 512), (64, 64), (364 * 16 // 14, 364 * 16 // 14), (512, 384)):
        emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=1, image_size=image_size, patch_size=16))
        n = tile // 16
        with torch.no_grad():
            emb.patch_embedding.weight.zero_()
            emb.patch_embedding.bias.zero_()
            emb.position_embedding.weight.copy_(torch.arange(emb.num_positions, dtype=torch.float32)[:, None])
            out = emb(torch.zeros(1, 3, tile, tile), torch.ones(1, n, n, dtype=torch.bool))
        np.testing.assert_array_equal(position_ids(n, n, image_size // 16), out[0, :, 0].numpy().astype(int))


def test_pixel_shuffle_matches_reference():
    torch = pytest.importorskip("torch")
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = np.random.default_rng(0).standard_normal((2, 64, 5)).astype(np.float32)
    for s in (2, 4):
        ref = Idefics3Connector.pixel_shuffle(None, torch.from_numpy(x), s).numpy()
        np.testing.assert_array_equal(pixel_shuffle(x, s), ref)


def test_vision_matches_reference_one_image(family, reference):
    _, model = reference
    im = family.preprocess(_rng_image(*IMAGES["wide"]))
    (ours,) = family.encode([im])
    ref = _reference_features(model, im.pixels)
    assert ours.shape == (im.rows, 64) == ref.shape
    assert _rel(ours, ref) < 1e-4


def test_vision_batched_equals_separate(family, reference):
    _, model = reference
    ims = [family.preprocess(_rng_image(*IMAGES[k])) for k in ("tall", "rgba")]
    batched = family.encode(ims)
    for im, feats in zip(ims, batched, strict=True):
        (alone,) = family.encode([im])
        assert feats.shape == (im.rows, 64)
        np.testing.assert_allclose(feats, alone, rtol=1e-5, atol=1e-6)
        assert _rel(feats, _reference_features(model, im.pixels)) < 1e-4


def test_chunked_equals_unchunked(tiny, family):
    im = family.preprocess(_rng_image(*IMAGES["square"]))
    one_tile_chunks = _family(tiny, max_chunk_tokens=16)
    np.testing.assert_allclose(one_tile_chunks.encode([im])[0], family.encode([im])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,tol", [("f16", 2e-3), ("q8", 3e-2)])
def test_vision_mixed_precision(tiny, family, reference, kind, tol):
    _, model = reference
    convert = (lambda w: HalfWeight(w.astype(np.float16))) if kind == "f16" else (lambda w: quantize(w, bits=8))
    fam = _family(tiny, convert=convert)
    assert all(layer.mlp.fc1.kind == kind for layer in fam.vision.layers)
    im = family.preprocess(_rng_image(*IMAGES["odd"]))
    assert _rel(fam.encode([im])[0], _reference_features(model, im.pixels)) < tol


def test_vision_rejects_bad_tensors_and_tiles(tiny, family):
    config = json.loads((tiny / "config.json").read_text())
    vision, _ = Idefics3Family.split_tensors(_load(tiny))
    del vision["encoder.layers.1.mlp.fc2.weight"]
    with pytest.raises(VlmError, match="fc2"):
        Idefics3Family(config, vision, {})
    with pytest.raises(VlmError):
        family.vision(np.zeros((1, 3, 48, 48), np.float32))


# --- config facts ------------------------------------------------------------------------


def test_text_config_and_prefixes(tiny, family):
    config = json.loads((tiny / "config.json").read_text())
    text = Idefics3Family.text_config(config)
    assert text["model_type"] == "llama"
    assert (text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (
        64, 4, 2, 16)
    assert (text["rope_theta"], text["rms_norm_eps"], text["vocab_size"]) == (100000.0, 1e-5, 49280)
    assert text["tie_word_embeddings"] is False
    # The hub SmolVLM-256M-Instruct layout: rope_theta at top level, no head_dim default needed.
    hub_text = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                "rope_theta": 100000, "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49280}
    hub = {"model_type": "idefics3", "text_config": hub_text}
    t = Idefics3Family.text_config(hub)
    assert (t["head_dim"], t["rope_theta"], t["rms_norm_eps"], t["tie_word_embeddings"]) == (64, 100000, 1e-5, False)

    vision, decoder = Idefics3Family.split_tensors(_load(tiny))
    assert "modality_projection.proj.weight" in vision and "post_layernorm.weight" in vision
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= decoder.keys()
    assert family.image_token_id == 49190 and family.image_seq_len == 4
    pos, delta = family.positions([TextSegment(np.arange(7))])
    np.testing.assert_array_equal(pos, np.arange(7))
    assert delta == 0


# --- end to end through vlm.load ---------------------------------------------------------


def _messages(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _reference_inputs(processor, messages: list[dict], images: list):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=images, return_tensors="pt")


@pytest.fixture(scope="module")
def loaded(tiny):
    import vlm

    return vlm.load(tiny, quantize="f32")


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_reference(loaded, reference, n_images):
    import torch

    processor, model = reference
    images = [_rng_image(*IMAGES["wide"]), _rng_image(*IMAGES["palette"])][:n_images]
    messages = _messages(n_images, "What is in the picture?")
    ours = loaded.logits(messages, images=images)
    inputs = _reference_inputs(processor, messages, images)
    with torch.no_grad():
        ref = model(**inputs).logits[0].numpy()
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < 1e-4


def test_greedy_generation_matches_reference(loaded, reference):
    import torch

    processor, model = reference
    images = [_rng_image(*IMAGES["tall"])]
    messages = _messages(1, "Describe it.")
    result = loaded.generate(messages, images=images, max_new_tokens=8)
    inputs = _reference_inputs(processor, messages, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert result.tokens == (ref[:ref.index(eos)] if eos in ref else ref)


def test_max_tiles_option_reaches_the_family(loaded):
    img = _rng_image(200, 180)
    full = loaded.prepare(_messages(1, "Hi"), images=[img])
    capped = loaded.prepare(_messages(1, "Hi"), images=[img], max_tiles=5)
    assert full.image_rows.size == 10 * 4 and capped.image_rows.size == 5 * 4


def test_smolvlm2_checkpoint_matches_reference(tiny_smolvlm2):
    """SmolVLM2's format (`model_type: smolvlm`) through vlm.load, against transformers' SmolVLM
    model, its image processor and its prompt builder (its full processor needs torchvision)."""
    import torch
    from transformers import AutoTokenizer, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    import vlm

    model = vlm.load(tiny_smolvlm2, quantize="f32")
    images = [_rng_image(*IMAGES["wide"]), _rng_image(*IMAGES["grey"])]
    messages = _messages(2, "Compare them.")
    pixels = SmolVLMImageProcessorPil.from_pretrained(tiny_smolvlm2)(images=[images], return_tensors="pt",
                                                                     return_row_col_info=True)
    text = model.tokenizer.apply_chat_template(messages)
    seq_len = json.loads((tiny_smolvlm2 / "processor_config.json").read_text())["image_seq_len"]
    for rows, cols in zip(pixels["rows"][0], pixels["cols"][0], strict=True):
        text = text.replace("<image>", get_image_prompt_string(rows, cols, seq_len, "<fake_token_around_image>",
                                                               "<image>", "<global-img>").replace("<image>", "\0"), 1)
    ids = AutoTokenizer.from_pretrained(tiny_smolvlm2)(text.replace("\0", "<image>"), return_tensors="pt",
                                                       add_special_tokens=False)["input_ids"]
    assert model.prepare(messages, images=images).ids.tolist() == ids[0].tolist()
    reference = SmolVLMForConditionalGeneration.from_pretrained(tiny_smolvlm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(input_ids=ids, pixel_values=pixels["pixel_values"],
                        pixel_attention_mask=pixels["pixel_attention_mask"]).logits[0].numpy()
    assert _rel(model.logits(messages, images=images), ref) < 1e-4
