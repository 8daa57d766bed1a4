"""Batch captioning as a user runs it: folders, globs, lists; resumable; bad images skipped."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vlm
from vlm.caption import caption, find_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (70, 50)), ("nested/b.jpg", (200, 90)), ("c.webp", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "notes.txt").write_text("not an image, and not .jpg either")
    return root


def run(*args):
    p = subprocess.run([sys.executable, "-m", "vlm", "caption", *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_find_images(folder, tmp_path):
    found = find_images(str(folder))
    assert [p.split("/")[-1] for p in found] == ["a.png", "broken.jpg", "c.webp", "b.jpg"]
    assert find_images(str(folder / "*.png")) == [str(folder / "a.png")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my images\n{folder / 'a.png'}\n\n{folder / 'c.webp'}\n")
    assert find_images(str(listing)) == [str(folder / "a.png"), str(folder / "c.webp")]
    with pytest.raises(vlm.VlmError, match="no images"):
        find_images(str(tmp_path / "nothing-*.png"))


def test_caption_folder_resumes_and_skips_bad_images(folder, tmp_path, tiny_smolvlm):
    out = tmp_path / "captions.jsonl"
    code, _, err = run(folder, "-o", out, "-m", tiny_smolvlm, "-n", "4", "-q", "--batch", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = [r for r in rows if "caption" in r]
    assert sorted(r["path"].split("/")[-1] for r in good) == ["a.png", "b.jpg", "c.webp"]
    assert all(set(r) == {"path", "caption", "tokens", "seconds"} for r in good)
    [bad] = [r for r in rows if "error" in r]  # a bad image gets an error record, not a hang or a crash
    assert bad["path"].endswith("broken.jpg") and set(bad) == {"path", "error"}
    assert "captioned 3, skipped 0 (already done), failed 1" in err and "broken.jpg" in err
    assert "images/s" in err and "mean caption" in err
    # A crash mid-write leaves a torn line: the re-run keeps the good lines and carries on.
    with open(out, "a") as f:
        f.write('{"path": "torn')
    code, _, err = run(folder, "-o", out, "-m", tiny_smolvlm, "-n", "4", "-q")
    assert code == 0, err
    assert "captioned 0, skipped 4" in err
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # the torn line was cut off


def test_caption_csv_and_python_api(folder, tmp_path, tiny_smolvlm):
    out = tmp_path / "captions.csv"
    model = vlm.load(tiny_smolvlm)
    summary = caption(model, str(folder / "*.png"), out, max_new_tokens=3, progress=False)
    assert summary.done == 1 and not summary.failed
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(folder / "a.png")]
    again = caption(model, str(folder / "*.png"), out, max_new_tokens=3, progress=False)
    assert again.done == 0 and again.skipped == 1


def test_caption_needs_a_vision_model(folder, tmp_path, tiny_llm):
    code, _, err = run(folder, "-o", tmp_path / "x.jsonl", "-m", tiny_llm("llama"))
    assert code == 1 and "vision" in err.strip().splitlines()[-1]
