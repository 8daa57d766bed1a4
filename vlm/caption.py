"""Batch captioning: a folder, glob or list of images -> JSONL or CSV, resumable and safe.

Images are opened and preprocessed in a background thread; each batch goes through the vision
encoder in one pass; captions are generated one by one (the shared text prompt before the
image stays in the KV cache). Every result is appended and flushed at once, so an interrupt
loses at most the image in flight, and a re-run skips what is already written.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vlm.errors import VlmError
from vlm.runtime import Model

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in one sentence."
CSV_FIELDS = ["path", "caption", "tokens", "seconds"]


def find_images(source: str) -> list[str]:
    """Image paths from a folder (recursive), a glob pattern, or a text file with one path a line."""
    p = Path(source)
    if p.is_dir():
        found = [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
    elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
        found = [str(p)]
    elif p.is_file():
        lines = p.read_text(encoding="utf-8").splitlines()
        found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    else:
        found = sorted(glob.glob(source, recursive=True))
    if not found:
        raise VlmError(f"no images found in {source}")
    return found


def already_done(output: Path) -> set[str]:
    """Paths with a result in an existing output file (a torn last line is ignored)."""
    if not output.is_file():
        return set()
    done = set()
    with open(output, encoding="utf-8", newline="") as f:
        if output.suffix.lower() == ".csv":
            done = {row["path"] for row in csv.DictReader(f) if row.get("path")}
        else:
            for line in f:
                try:
                    done.add(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    continue
    return done


class ResultWriter:
    """Appends one record at a time and flushes it to disk before returning."""

    def __init__(self, output: Path):
        self.csv = output.suffix.lower() == ".csv"
        new = not output.is_file() or output.stat().st_size == 0
        if not new and not self.csv:
            with open(output, "rb+") as f:  # a line torn by a crash: finish it so appends start clean
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        self.f = open(output, "a", encoding="utf-8", newline="")  # noqa: SIM115 (held across many writes)
        self.writer = csv.DictWriter(self.f, fieldnames=CSV_FIELDS) if self.csv else None
        if self.csv and new:
            self.writer.writeheader()

    def write(self, record: dict) -> None:
        if self.csv:
            self.writer.writerow({k: record[k] for k in CSV_FIELDS})
        else:
            self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


@dataclass
class CaptionSummary:
    done: int = 0
    skipped: int = 0  # already in the output
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    caption_chars: int = 0

    def text(self) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        mean = self.caption_chars / self.done if self.done else 0.0
        return (f"captioned {self.done}, skipped {self.skipped} (already done), failed {len(self.failed)}; "
                f"{rate:.2f} images/s; mean caption {mean:.0f} characters")


def _preprocessed(model: Model, paths: list[str], batch: int) -> Iterator[list[tuple[str, object]]]:
    """Batches of (path, preprocessed image or VlmError), prepared in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def work() -> None:
        for i in range(0, len(paths), batch):
            items = []
            for p in paths[i : i + batch]:
                try:
                    items.append((p, model.preprocess(p)))
                except VlmError as e:
                    items.append((p, e))
            while not stop.is_set():
                try:
                    q.put(items, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (items := q.get()) is not None:
            yield items
    finally:
        stop.set()


def caption(model: Model, source: str, output: str | os.PathLike, prompt: str = DEFAULT_PROMPT, batch: int = 4,
            max_new_tokens: int = 64, progress: bool = True, **generate_options) -> CaptionSummary:
    """Caption every image of `source` into `output` (.jsonl or .csv); returns what happened."""
    if model.family is None:
        raise VlmError("captioning needs a vision-language model; this one has no vision encoder")
    if batch < 1:
        raise VlmError("batch must be >= 1")
    output = Path(output)
    paths = find_images(source)
    done = already_done(output)
    todo = [p for p in paths if p not in done]
    summary = CaptionSummary(skipped=len(paths) - len(todo))
    writer = ResultWriter(output)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        for items in _preprocessed(model, todo, batch):
            ready = [(p, im) for p, im in items if not isinstance(im, VlmError)]
            for p, err in ((p, im) for p, im in items if isinstance(im, VlmError)):
                summary.failed.append((p, str(err)))
                tqdm.write(f"skipped {p}: {err}", file=sys.stderr)
                bar.update(1)
            try:
                model.encode_images([im for _, im in ready])  # the whole batch through the ViT at once
            except VlmError as e:
                summary.failed += [(p, str(e)) for p, _ in ready]
                bar.update(len(ready))
                ready = []
            for p, im in ready:
                t = time.perf_counter()
                try:
                    r = model.generate(prompt, images=[im], max_new_tokens=max_new_tokens, **generate_options)
                except VlmError as e:
                    summary.failed.append((p, str(e)))
                    tqdm.write(f"skipped {p}: {e}", file=sys.stderr)
                    bar.update(1)
                    continue
                text = r.text.strip()
                writer.write({"path": p, "caption": text, "tokens": len(r.tokens),
                              "seconds": round(time.perf_counter() - t, 3)})
                summary.done += 1
                summary.caption_chars += len(text)
                bar.update(1)
    finally:
        summary.seconds = time.perf_counter() - t0
        bar.close()
        writer.close()
    return summary
