"""`smolvlm-shapes`, the bundled vision model (scripts/train_shapes_vlm.py): small, loads by name,
answers held-out scenes through the default 4-bit path, and matches transformers on real
trained weights (docs/smolvlm-shapes.md has the full table)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlm
from vlm.registry import BUNDLED_MODELS, DEFAULT_MODEL, resolve
from vlm.testing.shapes import GRID, PLACES, TASKS, accuracy, held_out_questions, make_scene, scene_tokens, score
from vlm.testing.smolvlm_shapes import ask, transformers_agreement

BUNDLED = BUNDLED_MODELS["smolvlm-shapes"]
ROOT = Path(__file__).resolve().parent.parent

# What the shipped checkpoint scores on the test's 48 scenes (100%, 100%, 67%, 75%), less a margin
# for other CPUs' rounding; scripts/eval_shapes_vlm.py measures the issue's targets on 100 per task.
FLOORS = {"colour and shape, one object": 0.8, "count, 1-5 objects": 0.8, "position": 0.5,
          "text, 1-6 characters": 0.5}


def test_bundled_files_are_small_and_hold_the_image_side_and_adapters():
    from safetensors import safe_open

    weights = BUNDLED / "model.safetensors"
    assert weights.stat().st_size <= 5 * 2**20
    with safe_open(str(weights), "numpy") as f:
        names = list(f.keys())
    adapters = [n for n in names if re.fullmatch(r"model\.text_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.lora_[AB]"
                                                 r"\.weight", n)]
    assert len(adapters) == 2 * 4 * 30  # q/k/v/o of each of the 30 layers
    assert all(n.startswith(("model.vision_model.", "model.connector.")) for n in names if n not in adapters)
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["vlm_text_gguf"] == DEFAULT_MODEL  # the decoder is the default model's file, adapted at load
    out = subprocess.run([sys.executable, "-m", "vlm", "info", "smolvlm-shapes"], capture_output=True,
                         text=True, timeout=300)
    assert "adapters: LoRA on 120 decoder matrices (rank 8)" in out.stdout, out.stdout + out.stderr


def test_scenes_are_seeded_and_scored_by_the_fact_asked():
    a, b = make_scene(np.random.default_rng(5)), make_scene(np.random.default_rng(5))
    assert a.questions == b.questions and a.image.tobytes() == b.image.tobytes()
    assert score("count", "There are 3 shapes.", "There are 3 shapes.")
    assert not score("count", "There are 3 shapes.", "There are 4 shapes.")
    assert score("read", 'The text says "AB12".', 'the text says "AB12"')
    assert not score("read", 'The text says "AB12".', 'The text says "AB1".')
    assert score("describe", "I see a red circle and a blue star.", "I see a red circle and a blue star.")
    assert not score("describe", "I see a red circle and a blue star.", "I see a red circle.")
    assert len(held_out_questions(2)) == 2 * len(TASKS)


def test_scene_tokens_put_each_word_where_the_tower_sees_it():
    """The layout the checkpoint was trained on: a shape's colour and name above its place in
    the answer's own words; each character of the text in the column it is drawn in."""
    rng = np.random.default_rng(7)
    scene = next(s for s in (make_scene(rng, with_text=True) for _ in range(50)) if len(s.text) < 6)
    words = [scene_tokens(scene)[r * GRID:(r + 1) * GRID] for r in range(GRID)]
    for s in scene.shapes:
        r, c = 2 * s.cell[0], 2 * s.cell[1]
        assert words[r][c:c + 2] == [" " + s.colour, " " + s.shape]
        answer = f"The {s.shape} is {PLACES[s.cell]}."
        assert answer.endswith(" ".join(w.strip() for w in dict.fromkeys(words[r + 1][c:c + 2])) + ".")
    band, c = words[2 * scene.text_row], scene.text_column
    assert band == [" text"] * c + list(scene.text) + [" text"] * (GRID - c - len(scene.text))


def test_each_character_is_drawn_inside_its_own_image_token():
    """A glyph split across two rows of tokens leaves each token half a character to read: the
    ink of the text lies in the band's upper row, each character in the column its word names."""
    rng = np.random.default_rng(11)
    scenes = (make_scene(rng, n_shapes=1, with_text=True) for _ in range(100))
    # one shape, two cell rows away from the band (a shape may reach a little into the next cell)
    for scene in itertools.islice((s for s in scenes if abs(s.shapes[0].cell[0] - s.text_row) == 2), 12):
        tile = np.asarray(scene.image.resize((GRID * 32, GRID * 32), Image.BILINEAR), dtype=np.int32)
        cells = tile.reshape(GRID, 32, GRID, 32, 3).transpose(0, 2, 1, 3, 4)
        # ink: far from its token's median colour (backgrounds vary slowly or by small noise)
        ink = (np.abs(cells - np.median(cells, axis=(2, 3), keepdims=True)).sum(-1) > 150).sum((2, 3))
        row = 2 * scene.text_row
        drawn = ink[row, scene.text_column:scene.text_column + len(scene.text)]
        assert drawn.min() > 10, (scene.text, ink[row:row + 2])
        assert ink[row + 1].sum() < 0.05 * drawn.sum(), (scene.text, ink[row:row + 2])
        assert ink[row].sum() - drawn.sum() < 0.05 * drawn.sum(), (scene.text, ink[row:row + 2])


@pytest.fixture(scope="module")
def shapes_model(smollm2_gguf):
    return vlm.load("smolvlm-shapes")


@pytest.fixture(scope="module")
def held_out_accuracy(shapes_model):
    """About 50 held-out scenes (12 per task) through the default 4-bit path."""
    assert resolve("smolvlm-shapes") == BUNDLED
    return accuracy(lambda image, q: ask(shapes_model, image, q), per_task=12)


def test_held_out_accuracy_stays_at_what_the_shipped_checkpoint_measures(held_out_accuracy):
    """The same 48 scenes every run: a vision path that breaks falls to chance here."""
    assert all(held_out_accuracy[task] >= floor for task, floor in FLOORS.items()), held_out_accuracy


def test_greedy_answers_equal_transformers_in_f32(tmp_path, smollm2_gguf):
    """vlm at f32 and transformers on the same checkpoint (the decoder dequantized from the GGUF):
    equal prompt ids, and equal greedy answers for at least 95% of held-out questions."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    same, total = transformers_agreement(vlm.load("smolvlm-shapes", quantize="f32"), held_out_questions(3),
                                         tmp_path)
    assert same >= 0.95 * total, (same, total)


def test_cli_generate_with_an_image_and_no_model_uses_smolvlm_shapes(smollm2_gguf):
    out = subprocess.run([sys.executable, "-m", "vlm", "generate", "-i", str(ROOT / "examples/one-shape.jpg"),
                          "-p", "What is in this image?", "-n", "24"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("I see a")
