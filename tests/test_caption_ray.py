"""Captioning on a local Ray cluster (skipped without Ray: pip install "vlm[ray]", ~400 MB)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlm
from vlm import caption as caption_module
from vlm.caption import caption

ray = pytest.importorskip("ray")
from vlm.caption_ray import caption_on_ray  # noqa: E402 (needs Ray)


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster whose workers import this tree's vlm."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(vlm.__file__).parents[1])}})
    yield
    ray.shutdown()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_path(records):
    return {r["path"]: {k: v for k, v in r.items() if k != "seconds"} for r in records}


def test_ray_captions_equal_the_local_run_and_resume(cluster, tiny_smolvlm, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(22):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    (images / "22.png").write_bytes(b"\x89PNG broken")
    (images / "23.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    options = dict(batch=4, max_new_tokens=5, progress=False)
    local = tmp_path / "local.jsonl"
    caption(vlm.load(tiny_smolvlm), str(images), local, **options)
    expected = by_path(lines(local))
    assert len(expected) == 24 and sum("error" in r for r in expected.values()) == 2

    # A run stopped midway (an interrupt after 10 records), then run again: it completes, no duplicates.
    out = tmp_path / "ray.jsonl"
    real_write, written = caption_module.ResultWriter.write, []

    def write_then_stop(self, record):
        if len(written) == 10:
            raise KeyboardInterrupt
        real_write(self, record)
        written.append(record)

    monkeypatch.setattr(caption_module.ResultWriter, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        caption_on_ray(str(tiny_smolvlm), str(images), out, "local", workers=2, **options)
    monkeypatch.undo()
    assert len(lines(out)) == 10
    summary = caption_on_ray(str(tiny_smolvlm), str(images), out, "local", workers=2, **options)
    assert summary.skipped == 10 and summary.done + len(summary.failed) == 14
    records = lines(out)
    assert len(records) == 24 and len({r["path"] for r in records}) == 24  # each image once
    assert by_path(records) == expected  # same captions as the local run; the corrupt ones are errors
    assert summary.stages["decode"] > 0
