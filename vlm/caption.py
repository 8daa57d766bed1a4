"""Batch captioning: a folder, glob or list of images -> JSONL or CSV, resumable and safe.

Images are opened and preprocessed in a background thread; each batch goes through the vision
encoder in one pass; captions are generated one by one (the shared text prompt before the
image stays in the KV cache). Every result is appended whole and flushed at once, so an
interrupt loses at most the image in flight, and a re-run skips what is already written (a
record torn by a crash is cut off and redone). An image that cannot be read or captioned gets
a record with an `error` field instead of a caption.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
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

from vlm.errors import VlmError, shown
from vlm.runtime import Model

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_PROMPT = "Describe this image in one sentence."
CSV_FIELDS = ["path", "caption", "tokens", "seconds", "error"]


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


def complete_length(data: bytes, csv_format: bool) -> int:
    """Bytes of `data` up to the end of its last complete record (a line, or for CSV a row
    whose quoted fields are all closed: a caption may hold a newline inside quotes)."""
    if not csv_format:
        return data.rfind(b"\n") + 1
    end, quotes = 0, 0
    for i, byte in enumerate(data):
        if byte == 0x22:  # '"': a doubled quote inside a field flips the parity twice
            quotes ^= 1
        elif byte == 0x0A and not quotes:
            end = i + 1
    return end


def repair_torn_tail(output: Path) -> None:
    """Cut off a record torn by a crash or a full disk, so that the file holds only whole
    records and the torn image is captioned again."""
    if not output.is_file():
        return
    try:
        with open(output, "rb+") as f:
            data = f.read()
            keep = complete_length(data, output.suffix.lower() == ".csv")
            if keep < len(data):
                f.truncate(keep)
    except OSError as e:
        raise VlmError(f"cannot repair {shown(output)}: {e.strerror or e}") from None


def already_done(output: Path) -> set[str]:
    """Paths with a result in an existing output file."""
    if not output.is_file():
        return set()
    done = set()
    try:
        with open(output, encoding="utf-8", errors="replace", newline="") as f:
            if output.suffix.lower() == ".csv":
                done = {row["path"] for row in csv.DictReader(f) if row.get("path")}
            else:
                for line in f:
                    try:
                        done.add(json.loads(line)["path"])
                    except (ValueError, KeyError, TypeError):
                        continue
    except (OSError, csv.Error) as e:
        raise VlmError(f"cannot read {shown(output)}: {e}") from None
    return done


class ResultWriter:
    """Appends one record at a time, each in a single write of its whole line, flushed to
    disk before returning. A write that fails (full disk, file size limit) is undone, so the
    file never holds a partial record, and raised as one VlmError."""

    def __init__(self, output: Path):
        self.path = output
        self.csv = output.suffix.lower() == ".csv"
        try:
            new = not output.is_file() or output.stat().st_size == 0
            self.fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise VlmError(f"cannot write {shown(output)}: {e.strerror or e}") from None
        if self.csv and new:
            self._append(self._csv_line(CSV_FIELDS))

    @staticmethod
    def _csv_line(values: list) -> str:
        buf = io.StringIO()
        csv.writer(buf).writerow(values)
        return buf.getvalue()

    def _append(self, line: str) -> None:
        data = line.encode("utf-8")
        try:
            start = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            start = None  # a device such as /dev/full: nothing to undo
        try:
            written = os.write(self.fd, data)
            if written != len(data):  # a short write: the disk or the file size limit is full
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
            os.fsync(self.fd)
        except OSError as e:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, start)
            raise VlmError(f"cannot write {shown(self.path)}: {e.strerror or e}") from None

    def write(self, record: dict) -> None:
        if self.csv:
            self._append(self._csv_line([record.get(k, "") for k in CSV_FIELDS]))
        else:
            self._append(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        os.close(self.fd)


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
    """Batches of (path, preprocessed image or VlmError), prepared in a background thread.

    Any other exception in the thread is handed to the main thread and raised there: a dead
    worker must never leave the main thread waiting for ever."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def prepared(p: str) -> object:
        try:
            return model.preprocess(p)
        except VlmError as e:
            return e

    def work() -> None:
        try:
            for i in range(0, len(paths), batch):
                if not put([(p, prepared(p)) for p in paths[i : i + batch]]):
                    return
            put(None)
        except BaseException as e:  # noqa: BLE001 (handed over, raised in the main thread)
            put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            try:
                items = q.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise VlmError("the image preprocessing thread stopped unexpectedly") from None
                continue
            if items is None:
                return
            if isinstance(items, BaseException):
                raise items
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
    paths = list(dict.fromkeys(find_images(source)))  # an image listed twice is captioned once
    repair_torn_tail(output)
    done = already_done(output)
    todo = [p for p in paths if p not in done]
    summary = CaptionSummary(skipped=len(paths) - len(todo))
    writer = ResultWriter(output)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr)

    def failed(p: str, err: VlmError) -> None:
        writer.write({"path": p, "error": str(err)})
        summary.failed.append((p, str(err)))
        tqdm.write(f"skipped {shown(p, 200)}: {err}", file=sys.stderr)
        bar.update(1)

    t0 = time.perf_counter()
    try:
        for items in _preprocessed(model, todo, batch):
            ready = [(p, im) for p, im in items if not isinstance(im, VlmError)]
            for p, err in ((p, im) for p, im in items if isinstance(im, VlmError)):
                failed(p, err)
            try:
                model.encode_images([im for _, im in ready])  # the whole batch through the ViT at once
            except VlmError as e:
                for p, _ in ready:
                    failed(p, e)
                ready = []
            for p, im in ready:
                t = time.perf_counter()
                try:
                    r = model.generate(prompt, images=[im], max_new_tokens=max_new_tokens, **generate_options)
                except VlmError as e:
                    failed(p, e)
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
