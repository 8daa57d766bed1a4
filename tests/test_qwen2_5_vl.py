"""Qwen2.5-VL against transformers: window order, vision tower on several configs, end to end.

Qwen2.5-VL shares Qwen2-VL's processor, decoder and image positions, so this file checks what
differs (the windowed ViT) on its own and the whole model on the tiny checkpoint built by
vlm/testing/tiny_qwen2_5_vl.py (uneven windows, a full-attention block). The 4-bit / q8 / f16
bounds and the chat-cache checks of every family run in tests/test_vlm_quantized.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_qwen2_vl import ONE_IMAGE, TWO_IMAGES, _reference_inputs, _rel, _rng_image

from vlm.errors import VlmError
from vlm.models.qwen2_5_vl import Qwen2_5_VLFamily, VisionConfig, window_order
from vlm.testing.tiny_qwen2_5_vl import PREPROCESSOR_CONFIG, TINY_VISION
from vlm.testing.tiny_qwen2vl import randomize

pytestmark = pytest.mark.torch

# Vision configs the tower is checked on (tiny widths; out_hidden_size 64): windows of 2, 4 and
# 1 merged tokens, full attention in a middle block, the first block, or none.
TOWER_CONFIGS = {
    "uneven-windows+full-block": TINY_VISION,
    "window-4-no-full": {**TINY_VISION, "depth": 2, "window_size": 112, "fullatt_block_indexes": [],
                         "num_heads": 2, "intermediate_size": 80},
    "window-1-full-first": {**TINY_VISION, "depth": 2, "window_size": 28, "fullatt_block_indexes": [0]},
}
# (height, width): merged grids 3x5 and 7x2 (neither a multiple of the window), 2x2, a palette image.
IMAGES = {"odd": (90, 130), "tall": (200, 60), "small": (50, 50)}


def _images(seed: int = 0):
    return [_rng_image(h, w, seed=seed + i) for i, (h, w) in enumerate(IMAGES.values())] + [
        _rng_image(70, 100, "P", seed=seed)]


@pytest.mark.parametrize("grids", [[(1, 6, 10)], [(1, 14, 4), (1, 4, 4), (2, 6, 10)], [(1, 16, 16)]])
@pytest.mark.parametrize("window_size", [28, 56, 112])
def test_window_order_matches_reference(grids, window_size):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.vision_utils import get_vision_window_index

    expected_order, expected_bounds = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2,
                                                              window_size=window_size, patch_size=14)
    order, spans = window_order(grids, 2, window_size // 28)
    np.testing.assert_array_equal(order, expected_order.numpy())
    assert [a for a, _ in spans] + [spans[-1][1]] == expected_bounds.tolist()
    assert all(a < b for a, b in spans)


def test_vision_config_from_hub_and_transformers5_layouts():
    hub = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
           "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
           "tokens_per_second": 2, "temporal_patch_size": 2}
    v5 = {k: v for k, v in hub.items() if k not in ("in_chans", "spatial_patch_size")} | {"in_channels": 3}
    a, b = VisionConfig.from_dict(hub), VisionConfig.from_dict(v5)
    assert a == b
    assert (a.embed_dim, a.hidden_size, a.head_dim, a.intermediate_size) == (1280, 2048, 80, 3420)
    assert a.window_tokens == 4 and a.fullatt_block_indexes == (7, 15, 23, 31) and a.patch_dim == 1176
    with pytest.raises(VlmError, match="window_size"):
        VisionConfig.from_dict({**hub, "window_size": 20})


@pytest.mark.parametrize("case", list(TOWER_CONFIGS))
def test_vision_tower_matches_reference(case):
    """Random weights of a vision config through both towers, four images of odd sizes in one pass."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vision = TOWER_CONFIGS[case]
    ref = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLConfig(vision_config=vision).vision_config).eval()
    torch.manual_seed(0)
    randomize(ref)
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    config = {"vision_config": vision, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 1, "num_attention_heads": 4}
    family = Qwen2_5_VLFamily(config, tensors, PREPROCESSOR_CONFIG)
    images = [family.preprocess(im) for im in _images()]
    ours = family.encode(images)
    with torch.no_grad():
        expected = ref(torch.from_numpy(np.concatenate([p.pixels for p in images])),
                       grid_thw=torch.tensor([p.grid for p in images])).pooler_output.numpy()
    expected = np.split(expected, np.cumsum([p.rows for p in images])[:-1])
    for o, e in zip(ours, expected, strict=True):
        assert o.shape == e.shape and _rel(o, e) < 1e-4
    assert _rel(family.encode(images[1:2])[0], ours[1]) < 1e-5  # alone == in the batch


# --- the whole model, against transformers --------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_qwen2_5_vl):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(1)
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl).eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_qwen2_5_vl):
    import vlm

    return vlm.load(tiny_qwen2_5_vl, quantize="f32")


def test_loads_as_qwen2_5_vl(tiny_model, tiny_qwen2_5_vl):
    assert isinstance(tiny_model.family, Qwen2_5_VLFamily)
    assert json.loads((Path(tiny_qwen2_5_vl) / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert tiny_model.family.vision_config.fullatt_block_indexes == (1,)


def test_hub_layout_config_loads_the_same_model(tiny_model, tiny_qwen2_5_vl, tmp_path):
    """The hub's config.json (text keys at the top, rope_scaling, in_chans) gives the same model as
    transformers 5's (nested text_config, rope_parameters, in_channels)."""
    import vlm

    v5 = json.loads((Path(tiny_qwen2_5_vl) / "config.json").read_text())
    text = {k: v for k, v in v5.pop("text_config").items() if k != "model_type"}
    rope = text.pop("rope_parameters")
    vision = {k: v for k, v in v5.pop("vision_config").items() if k not in ("in_channels", "rope_parameters")}
    hub = {**v5, **text, "rope_theta": rope["rope_theta"],
           "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
           "vision_config": {**vision, "in_chans": 3, "spatial_patch_size": 14}}
    for f in Path(tiny_qwen2_5_vl).iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(hub))
    image = _rng_image(90, 130)
    np.testing.assert_array_equal(vlm.load(tmp_path, quantize="f32").logits(ONE_IMAGE, images=[image]),
                                  tiny_model.logits(ONE_IMAGE, images=[image]))


def test_positions_match_reference(tiny_model, reference, tiny_qwen2_5_vl):
    import torch

    family = tiny_model.family
    images = [family.preprocess(im) for im in _images()[:2]]
    inputs = _reference_inputs(tiny_qwen2_5_vl, TWO_IMAGES, _images()[:2])
    ids = inputs["input_ids"]
    ours = tiny_model.prepare(TWO_IMAGES, images=_images()[:2])
    np.testing.assert_array_equal(ours.ids, ids[0].numpy())
    positions, delta = ours.positions, ours.rope_delta
    expected, expected_delta = reference.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=torch.tensor([p.grid for p in images]))
    np.testing.assert_array_equal(positions, expected[:, 0].numpy())
    assert delta == int(expected_delta[0, 0])


PALETTE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colours?"}]}]
E2E_CASES = {"one-image": (ONE_IMAGE, ["odd"]), "two-odd-images": (TWO_IMAGES, ["odd", "tall"]),
             "palette": (PALETTE, ["palette"])}


def _case_images(names: list[str], seed: int):
    by_name = dict(zip([*IMAGES, "palette"], _images(seed), strict=True))
    return [by_name[n] for n in names]


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_logits_and_greedy_output_match_reference(case, tiny_model, reference, tiny_qwen2_5_vl):
    import torch

    messages, names = E2E_CASES[case]
    images = _case_images(names, seed=3)
    inputs = _reference_inputs(tiny_qwen2_5_vl, messages, images)
    ours = tiny_model.logits(messages, images=images)
    with torch.no_grad():
        expected = reference(**inputs).logits[0].numpy()
    assert ours.shape == expected.shape and _rel(ours, expected) < 1e-4
    tiny_model.reset()
    tokens = tiny_model.generate(messages, images=images, max_new_tokens=10).tokens
    assert [t for t in tokens if t not in tiny_model.tokenizer.eos_ids] == _reference_greedy(reference, inputs, 10)


def _reference_greedy(reference, inputs: dict, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=n, do_sample=False)
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    expected = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in eos]
    assert expected, "the reference generated nothing: the comparison would be empty"
    return expected


def test_multi_turn_chat_reuses_the_image_and_matches_reference(tiny_model, reference, tiny_qwen2_5_vl):
    import vlm

    tiny_model.reset()
    first, second = _case_images(["odd", "tall"], seed=7)
    chat = vlm.Chat(tiny_model, max_new_tokens=8)
    chat.send("Describe it.", images=[first])
    reply = chat.send("And this one?", images=[second])
    assert reply.stats.images == 2 and reply.stats.images_encoded == 1  # the first image came from the cache
    assert reply.stats.cached_tokens > 0
    inputs = _reference_inputs(tiny_qwen2_5_vl, chat.messages()[:-1], [first, second])
    ours = [t for t in reply.tokens if t not in tiny_model.tokenizer.eos_ids]
    assert ours == _reference_greedy(reference, inputs, 8)


def test_cli_convert_info_caption_chat_bench(tiny_qwen2_5_vl, tmp_path):
    """The commands a user runs on a new family: convert to 4-bit, describe, caption a folder, chat, bench."""
    from test_cli import run

    code, out, err = run("convert", tiny_qwen2_5_vl, tmp_path / "q4", "--bits", "4", "--vision-bits", "8")
    assert code == 0 and "smaller" in out, err
    code, out, err = run("info", tmp_path / "q4")
    assert code == 0 and "qwen2_5_vl" in out and "vision: True" in out, err
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(90, 130), (200, 60)]):
        _rng_image(h, w, seed=i).save(folder / f"{i}.png")
    code, _, err = run("caption", folder, "-o", tmp_path / "captions.jsonl", "-m", tmp_path / "q4", "-n", "3", "-q")
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert code == 0 and len(rows) == 2 and "captioned 2" in err, err
    code, out, err = run("chat", "-m", tmp_path / "q4", "-n", "3", "-i", folder / "0.png",
                         input="Describe it.\nAnd now?\n")
    stats = [line for line in out.splitlines() if line.startswith("prompt ")]  # one line after each answer
    assert code == 0 and "qwen2_5_vl" in out and len(stats) == 2, err
    assert "(1 img encoded)" in stats[0] and "encoded" not in stats[1] and "cached)" in stats[1]
    code, out, err = run("bench", "-m", tmp_path / "q4", "-p", "8", "-n", "2", "-r", "1", "--image-size", "90x130",
                         "--json")
    assert code == 0, err
    assert [r["test"].split(" (")[0] for r in json.loads(out)["rows"]][-1] == "vision 90x130"
