"""Qwen2-VL against transformers: preprocessing, vision tower, M-RoPE positions, end to end.

The reference model is a tiny random Qwen2-VL built once per module by vlm/testing/tiny_qwen2vl.py.
Tests that need no reference (errors, chunking, precision) run without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.errors import VlmError
from vlm.models.qwen2_vl import ProcessorSettings, Qwen2VisionTransformer, Qwen2VLFamily, VisionConfig, smart_resize
from vlm.models.qwen2_vl.processor import preprocess_image
from vlm.quant import HalfWeight, quantize
from vlm.testing import tiny_qwen2vl as make_tiny

SETTINGS = ProcessorSettings.from_config(make_tiny.PREPROCESSOR_CONFIG)
TINY_VISION = {"depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 48}


def _rng_image(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels; L and RGBA drawn directly, other modes converted from RGB."""
    rng = np.random.default_rng(seed)
    shape = {"L": (h, w), "RGBA": (h, w, 4)}.get(mode, (h, w, 3))
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    return img if img.mode == mode else img.convert(mode)


def _random_vision_tensors(config: VisionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, f = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    merged = d * config.spatial_merge_size ** 2

    def n(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"patch_embed.proj.weight": n(d, config.in_channels, config.temporal_patch_size, config.patch_size,
                                      config.patch_size)}
    for i in range(config.depth):
        p = f"blocks.{i}."
        t.update({p + "norm1.weight": 1 + n(d), p + "norm1.bias": n(d), p + "norm2.weight": 1 + n(d),
                  p + "norm2.bias": n(d), p + "attn.qkv.weight": n(3 * d, d), p + "attn.qkv.bias": n(3 * d),
                  p + "attn.proj.weight": n(d, d), p + "attn.proj.bias": n(d), p + "mlp.fc1.weight": n(f, d),
                  p + "mlp.fc1.bias": n(f), p + "mlp.fc2.weight": n(d, f), p + "mlp.fc2.bias": n(d)})
    t.update({"merger.ln_q.weight": 1 + n(d), "merger.ln_q.bias": n(d), "merger.mlp.0.weight": n(merged, merged),
              "merger.mlp.0.bias": n(merged), "merger.mlp.2.weight": n(config.hidden_size, merged),
              "merger.mlp.2.bias": n(config.hidden_size)})
    return t


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- without a reference --------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(1, 201), (300, 1), (1, 1000)])
def test_extreme_aspect_is_a_vlm_error(h, w):
    with pytest.raises(VlmError, match="aspect ratio"):
        preprocess_image(_rng_image(h, w), SETTINGS)


def test_bad_sizes_are_vlm_errors():
    with pytest.raises(VlmError):
        smart_resize(0, 10)
    for cap in (0, -3, 1.5):
        with pytest.raises(VlmError, match="max_image_tokens"):
            preprocess_image(_rng_image(20, 20), SETTINGS, max_image_tokens=cap)


def test_token_cap_and_tiny_images():
    big = _rng_image(1000, 1400)
    assert preprocess_image(big, SETTINGS, max_image_tokens=100).rows <= 100
    assert preprocess_image(big, SETTINGS, max_image_tokens=None).rows == 72 * 100 // 4
    for h, w in [(1, 1), (10, 10), (1, 150)]:
        p = preprocess_image(_rng_image(h, w), SETTINGS)
        assert p.pixels.shape == (p.grid[1] * p.grid[2], 1176)
        assert p.grid[1] * p.grid[2] * 196 >= SETTINGS.min_pixels


def test_digest_identifies_pixels_and_settings():
    a, b = _rng_image(50, 60, seed=1), _rng_image(50, 60, seed=2)
    assert preprocess_image(a, SETTINGS).digest == preprocess_image(a.copy(), SETTINGS).digest
    assert preprocess_image(a, SETTINGS).digest != preprocess_image(b, SETTINGS).digest
    big = _rng_image(600, 600, seed=1)
    assert preprocess_image(big, SETTINGS, 64).digest != preprocess_image(big, SETTINGS, 256).digest


def test_processor_settings_from_hub_and_transformers5_layouts():
    v5 = {k: v for k, v in make_tiny.PREPROCESSOR_CONFIG.items() if k not in ("min_pixels", "max_pixels")}
    v5.update(size={"shortest_edge": 3136, "longest_edge": 12845056}, resample=3, rescale_factor=1 / 255)
    assert ProcessorSettings.from_config(v5) == SETTINGS
    assert SETTINGS.max_pixels == 12845056 and SETTINGS.max_pixels_for(1024) == 1024 * 28 * 28


def test_attention_chunking_matches_unchunked():
    config = VisionConfig.from_dict(TINY_VISION)
    tensors = _random_vision_tensors(config)
    images = [preprocess_image(_rng_image(90, 120, seed=3), SETTINGS), preprocess_image(_rng_image(60, 40), SETTINGS)]
    pixels = np.concatenate([p.pixels for p in images])
    grids = [p.grid for p in images]
    whole = Qwen2VisionTransformer(config, tensors, max_score_bytes=1 << 30)(pixels, grids)
    # 64 bytes of scores = 16 keys' worth: several chunks per image, down to one query at a time.
    for budget in (64, 1):
        chunked = Qwen2VisionTransformer(config, tensors, max_score_bytes=budget)(pixels, grids)
        assert _rel(chunked, whole) < 1e-5


def test_vision_in_half_and_8bit_weights():
    config = VisionConfig.from_dict(TINY_VISION)
    tensors = _random_vision_tensors(config)
    p = preprocess_image(_rng_image(100, 80), SETTINGS)
    ref = Qwen2VisionTransformer(config, tensors)(p.pixels, [p.grid])
    matrices = [k for k, v in tensors.items() if v.ndim >= 2]
    half = {k: HalfWeight(v.astype(np.float16)) if k in matrices else v for k, v in tensors.items()}
    q8 = {k: quantize(v, bits=8) if k in matrices and v.ndim == 2 else v for k, v in tensors.items()}
    assert _rel(Qwen2VisionTransformer(config, half)(p.pixels, [p.grid]), ref) < 5e-3
    assert _rel(Qwen2VisionTransformer(config, q8)(p.pixels, [p.grid]), ref) < 3e-2


def test_text_config_from_hub_and_transformers5_layouts():
    v5 = {"model_type": "qwen2_vl", "image_token_id": 151655, "tie_word_embeddings": True,
          "text_config": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                          "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "eos_token_id": 151645,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                              "mrope_section": [16, 24, 24]}},
          "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "in_channels": 3}}
    hub = {"model_type": "qwen2_vl", "image_token_id": 151655, "tie_word_embeddings": True, "vocab_size": 151936,
           "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
           "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1e6,
           "eos_token_id": 151645, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "in_chans": 3}}
    a, b = Qwen2VLFamily.text_config(v5), Qwen2VLFamily.text_config(hub)
    assert a == b
    assert a["model_type"] == "qwen2" and a["attention_bias"] and a["head_dim"] == 128
    assert a["mrope_section"] == [16, 24, 24] and a["rope_theta"] == 1e6 and a["tie_word_embeddings"]
    assert VisionConfig.from_dict(v5["vision_config"]) == VisionConfig.from_dict(hub["vision_config"])


def test_split_tensors_in_both_naming_schemes():
    hub = {"visual.blocks.0.attn.qkv.weight": 1, "model.layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3}
    v5 = {"model.visual.blocks.0.attn.qkv.weight": 1, "model.language_model.layers.0.mlp.up_proj.weight": 2,
          "lm_head.weight": 3}
    expected = ({"blocks.0.attn.qkv.weight": 1}, {"model.layers.0.mlp.up_proj.weight": 2, "lm_head.weight": 3})
    assert Qwen2VLFamily.split_tensors(hub) == expected
    assert Qwen2VLFamily.split_tensors(v5) == expected


# --- against transformers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny_qwen2vl) -> Path:
    return tiny_qwen2vl


@pytest.fixture(scope="module")
def reference(tiny_dir):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(1)
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def family(tiny_dir) -> Qwen2VLFamily:
    from safetensors.numpy import load_file

    config = json.loads((tiny_dir / "config.json").read_text())
    vision, _ = Qwen2VLFamily.split_tensors(load_file(tiny_dir / "model.safetensors"))
    return Qwen2VLFamily(config, vision, json.loads((tiny_dir / "preprocessor_config.json").read_text()))


def _reference_processor(tmp_path: Path):
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(make_tiny.PREPROCESSOR_CONFIG))
    return AutoImageProcessor.from_pretrained(tmp_path)


def _palette_with_transparency() -> Image.Image:
    img = _rng_image(40, 60, "P")
    img.info["transparency"] = 3
    return img


PROCESSOR_CASES = {
    "1x1": lambda: _rng_image(1, 1),
    "10x10": lambda: _rng_image(10, 10),
    "odd": lambda: _rng_image(123, 457),
    "wide": lambda: _rng_image(20, 3000),
    "very-wide": lambda: _rng_image(5, 995),
    "tall": lambda: _rng_image(1500, 30),
    "large": lambda: _rng_image(1000, 1400),
    "rgba": lambda: _rng_image(50, 70, "RGBA"),
    "palette": lambda: _rng_image(40, 90, "P"),
    "palette-transparent": _palette_with_transparency,
    "greyscale": lambda: _rng_image(64, 80, "L"),
    "grey-alpha": lambda: _rng_image(33, 47, "RGBA").convert("LA"),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
@pytest.mark.parametrize("cap", [None, 64])
def test_processor_matches_reference(case, cap, tmp_path):
    ref = _reference_processor(tmp_path)
    img = PROCESSOR_CASES[case]()
    size = {"shortest_edge": SETTINGS.min_pixels, "longest_edge": SETTINGS.max_pixels_for(cap)}
    expected = ref(images=[img], size=size, return_tensors="np")
    ours = preprocess_image(img, SETTINGS, max_image_tokens=cap)
    assert [list(ours.grid)] == expected["image_grid_thw"].tolist()
    assert ours.pixels.dtype == np.float32
    np.testing.assert_array_equal(ours.pixels, expected["pixel_values"])
    assert ours.rows == ours.pixels.shape[0] // 4


def _reference_vision(reference, images) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = reference.model.visual(torch.from_numpy(np.concatenate([p.pixels for p in images])),
                                     grid_thw=torch.tensor([p.grid for p in images]))
    return out.pooler_output.numpy()


@pytest.mark.torch
def test_vision_tower_matches_reference(family, reference):
    image = family.preprocess(_rng_image(90, 130, seed=5))
    (ours,) = family.encode([image])
    assert ours.shape == (image.rows, 64)
    assert _rel(ours, _reference_vision(reference, [image])) < 1e-4


@pytest.mark.torch
def test_batched_encoding_matches_reference_and_single(family, reference):
    images = [family.preprocess(_rng_image(90, 130, seed=6)), family.preprocess(_rng_image(200, 60, seed=7))]
    assert images[0].grid != images[1].grid
    batched = family.encode(images)
    expected = np.split(_reference_vision(reference, images), [images[0].rows])
    for ours, ref, image in zip(batched, expected, images, strict=True):
        assert _rel(ours, ref) < 1e-4
        assert _rel(ours, family.encode([image])[0]) < 1e-5


def _chat_ids(tiny_dir: Path, messages: list, images) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return np.asarray(tok(text).input_ids, dtype=np.int64), text


TWO_IMAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare this"},
                                           {"type": "image"}, {"type": "text", "text": "with that one."}]}]


@pytest.mark.torch
def test_prompt_ids_and_positions_match_reference(tiny_model, reference, tiny_dir):
    import torch

    images = [_rng_image(90, 130, seed=1), _rng_image(260, 60, seed=2)]
    processed = [tiny_model.preprocess(im) for im in images]
    _, text = _chat_ids(tiny_dir, TWO_IMAGES, images)
    expanded = text
    for p in processed:
        expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * p.rows, 1)
    from transformers import AutoTokenizer

    expanded = expanded.replace("<|placeholder|>", "<|image_pad|>")
    ids = np.asarray(AutoTokenizer.from_pretrained(tiny_dir)(expanded).input_ids, dtype=np.int64)
    inputs = tiny_model.prepare(TWO_IMAGES, images=images)
    np.testing.assert_array_equal(inputs.ids, ids)
    family = tiny_model.family
    np.testing.assert_array_equal(inputs.image_rows, np.flatnonzero(ids == family.image_token_id))
    t_ids = torch.from_numpy(ids)[None]
    expected, expected_delta = reference.model.get_rope_index(
        t_ids, mm_token_type_ids=(t_ids == family.image_token_id).int(),
        image_grid_thw=torch.tensor([p.grid for p in processed]))
    np.testing.assert_array_equal(inputs.positions, expected[:, 0].numpy())
    assert inputs.rope_delta == int(expected_delta[0, 0])
    with pytest.raises(VlmError, match="placeholder"):  # the text's own placeholders and the image's
        tiny_model.prepare(text, images=images[:1], raw=True)


# --- end to end through vlm.load ----------------------------------------------------------------


ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


def _reference_inputs(tiny_dir: Path, messages: list, images: list) -> dict:
    """What Qwen2VLProcessor would produce (it cannot be built here without torchvision)."""
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(tiny_dir)(images=images, return_tensors="pt")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for grid in pixels["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // 4), 1)
    ids = torch.tensor([tok(text.replace("<|placeholder|>", "<|image_pad|>")).input_ids])
    image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"],
            "mm_token_type_ids": (ids == image_token_id).int()}


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    import vlm

    return vlm.load(tiny_dir, quantize="f32")


E2E_CASES = {"one-image": (ONE_IMAGE, [(90, 130)]), "two-images": (TWO_IMAGES, [(90, 130), (200, 60)])}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_logits_match_reference(case, tiny_model, reference, tiny_dir):
    import torch

    messages, sizes = E2E_CASES[case]
    images = [_rng_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ours = tiny_model.logits(messages, images=images)
    with torch.no_grad():
        expected = reference(**_reference_inputs(tiny_dir, messages, images)).logits[0].numpy()
    assert ours.shape == expected.shape
    assert _rel(ours, expected) < 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_greedy_generation_matches_reference(case, tiny_model, reference, tiny_dir):
    import torch

    messages, sizes = E2E_CASES[case]
    images = [_rng_image(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    tiny_model.reset()
    ours = tiny_model.generate(messages, images=images, max_new_tokens=12).tokens
    inputs = _reference_inputs(tiny_dir, messages, images)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=12, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    strip = [t for t in expected if t not in eos]
    assert [t for t in ours if t not in eos] == strip
    assert len(strip) > 0
