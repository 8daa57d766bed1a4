"""Batch captioning as a user runs it: folders, globs, lists; resumable; bad images skipped."""

import csv
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import vlm
from vlm.caption import caption, find_images, in_shard, parse_shard


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
    assert "images/min" in err and "mean caption" in err and "time per stage: load+preprocess" in err
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


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """12 small images (one corrupt) in a folder, and the same files in a WebDataset tar shard."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(1)
    for i in range(11):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "011.png").write_bytes(b"\x89PNG not really")
    shard = root.parent / f"{root.name}-00000.tar"
    with tarfile.open(shard, "w") as tar:  # img2dataset's layout: key.png beside key.txt and key.json
        for f in sorted(root.iterdir()):
            tar.add(f, arcname=f.name)
            for ext, text in ((".txt", "a caption"), (".json", "{}")):
                info = tarfile.TarInfo(f.stem + ext)
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text.encode()))
    return root, shard


def records(path, without=("seconds",)):
    """The records of a JSONL output by image name, without the timing."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["path"].split("/")[-1]: {k: v for k, v in r.items() if k not in without and k != "path"} for r in rows}


@pytest.fixture(scope="module")
def small_model(tiny_smolvlm):
    return vlm.load(tiny_smolvlm)


@pytest.fixture(scope="module")
def batch1(many, small_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch1") / "b1.jsonl"
    caption(small_model, str(many[0]), out, batch=1, max_new_tokens=6, progress=False)
    return records(out)


def test_batched_captions_equal_one_by_one(many, small_model, batch1, tmp_path):
    out = tmp_path / "b8.jsonl"
    summary = caption(small_model, str(many[0]), out, batch=8, max_new_tokens=6, progress=False)
    assert records(out) == batch1 and len(batch1) == 12
    assert len({r["caption"] for r in batch1.values() if "caption" in r}) > 1  # not one caption for all
    assert "error" in batch1["011.png"] and summary.done == 11 and len(summary.failed) == 1
    assert all(summary.stages[s] > 0 for s in ("load+preprocess", "encode", "prefill", "decode"))


def test_shards_split_ids_evenly_and_stably():
    """Fixed ids (the run above lives in a temp folder whose name moves the split)."""
    ids = [f"photos/{i:05d}.jpg" for i in range(300)]
    sizes = [sum(in_shard(i, (k, 3)) for i in ids) for k in range(3)]
    assert sum(sizes) == 300 and all(70 <= n <= 130 for n in sizes), sizes
    assert [in_shard("photos/00007.jpg", (k, 3)) for k in range(3)].count(True) == 1


def test_shards_together_equal_the_whole_run(many, small_model, batch1, tmp_path):
    parts = []
    for k in range(3):
        out = tmp_path / f"part{k}.jsonl"
        caption(small_model, str(many[0]), out, batch=4, max_new_tokens=6, progress=False, shard=(k, 3))
        parts.append(records(out))
    assert sum(len(p) for p in parts) == 12  # every image in exactly one shard
    assert {name: r for p in parts for name, r in p.items()} == batch1
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(vlm.VlmError, match="--shard"):
            parse_shard(bad)


def test_tar_shard_equals_the_folder(many, small_model, batch1, tmp_path):
    root, shard = many
    assert find_images(str(shard)) == [f"{shard}/{i:03d}.png" for i in range(12)]
    out = tmp_path / "tar.jsonl"
    caption(small_model, str(shard), out, batch=4, max_new_tokens=6, progress=False)
    from_tar = records(out)
    assert from_tar.pop("011.png")["error"] == "not an image file: image bytes"  # the record's path names it
    assert from_tar == {name: r for name, r in batch1.items() if name != "011.png"}
    assert all(line.startswith(f'{{"path": "{shard}/') for line in out.read_text().splitlines())
    again = caption(small_model, str(shard), out, batch=4, max_new_tokens=6, progress=False)
    assert again.skipped == 12 and again.done == 0  # a tar member's id is stable: the re-run resumes


def test_ray_missing_is_one_clear_error(folder, tmp_path, tiny_smolvlm, monkeypatch):
    from vlm.caption_ray import caption_on_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed

    with pytest.raises(vlm.VlmError, match=r'pip install "vlm\[ray\]"'):
        caption_on_ray(str(tiny_smolvlm), str(folder), tmp_path / "y.jsonl", "local")
