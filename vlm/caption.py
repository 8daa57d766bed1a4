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
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vlm.errors import VlmError, shown
from vlm.runtime import Model

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
INPUT_EXTENSIONS = IMAGE_EXTENSIONS | {".tar"}  # a .tar is a WebDataset shard of images
DEFAULT_PROMPT = "Describe this image in one sentence."
CSV_FIELDS = ["path", "caption", "tokens", "seconds", "error"]


def find_images(source: str) -> list[str]:
    """Image ids from a folder (recursive), a glob pattern, a text file with one path a line, or
    WebDataset tar shards (a .tar, or .tar files among the above): a tar member's id is
    `shard.tar/key.ext`, stable across runs so that a re-run resumes."""
    p = Path(source)
    if p.is_dir():
        found = [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in INPUT_EXTENSIONS and f.is_file()]
    elif p.is_file() and p.suffix.lower() in INPUT_EXTENSIONS:
        found = [str(p)]
    elif p.is_file():
        lines = p.read_text(encoding="utf-8").splitlines()
        found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    else:
        found = sorted(glob.glob(source, recursive=True))
    found = [member for f in found for member in (tar_members(f) if f.lower().endswith(".tar") else [f])]
    if not found:
        raise VlmError(f"no images found in {source}")
    return found


def _is_image_member(member: tarfile.TarInfo) -> bool:
    return member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS


def tar_members(shard: str) -> list[str]:
    """The ids of a WebDataset shard's images (`key.jpg`, `key.png`, ...; the `key.txt` and
    `key.json` beside them are not images and are passed over), in the shard's order."""
    try:
        with tarfile.open(shard, "r|*") as tar:  # a stream: headers read in order, nothing unpacked
            return [f"{shard}/{m.name}" for m in tar if _is_image_member(m)]
    except (OSError, tarfile.TarError) as e:
        raise VlmError(f"cannot read tar shard {shown(shard)}: {e}") from None


def split_tar_id(image_id: str) -> tuple[str | None, str]:
    """(shard, member name) of a tar member's id; (None, path) for a plain file."""
    i = image_id.lower().find(".tar/")
    if i < 0 or not os.path.isfile(image_id[: i + 4]):
        return None, image_id
    return image_id[: i + 4], image_id[i + 5 :]


def read_images(ids: list[str]) -> Iterator[tuple[str, str | bytes | VlmError]]:
    """Each id with what to load it from: a file's path, a tar member's bytes (each shard read
    once, as a stream, for its run of consecutive ids), or the error that made it unreadable."""
    i = 0
    while i < len(ids):
        shard, _ = split_tar_id(ids[i])
        if shard is None:
            yield ids[i], ids[i]
            i += 1
            continue
        j = i
        while j < len(ids) and split_tar_id(ids[j])[0] == shard:
            j += 1
        wanted = set(ids[i:j])
        try:
            with tarfile.open(shard, "r|*") as tar:
                for m in tar:
                    image_id = f"{shard}/{m.name}"
                    if image_id in wanted and _is_image_member(m):
                        wanted.discard(image_id)
                        yield image_id, tar.extractfile(m).read()
        except (OSError, tarfile.TarError) as e:
            for image_id in wanted:
                yield image_id, VlmError(f"cannot read tar shard {shown(shard)}: {e}")
            wanted = set()
        for image_id in wanted:
            yield image_id, VlmError(f"{shown(image_id, 200)} is not in its tar shard")
        i = j


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise VlmError(f"--shard must be K/N (for example 0/4), got {text!r}") from None
    if not 0 <= k < n:
        raise VlmError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def in_shard(image_id: str, shard: tuple[int, int]) -> bool:
    """Whether an id belongs to shard K of N: a stable hash of the id string (CRC-32, the same
    on every machine and run, unlike Python's salted hash), so N jobs split the work without
    talking to each other and each image lands in exactly one shard."""
    k, n = shard
    return zlib.crc32(image_id.encode("utf-8")) % n == k


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


STAGES = ("load+preprocess", "encode", "prefill", "decode")


@dataclass
class CaptionSummary:
    done: int = 0
    skipped: int = 0  # already in the output
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    caption_chars: int = 0
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # seconds, summed

    def text(self) -> str:
        rate = 60 * self.done / self.seconds if self.seconds else 0.0
        mean = self.caption_chars / self.done if self.done else 0.0
        stages = ", ".join(f"{name} {s:.2f} s" for name, s in self.stages.items())
        return (f"captioned {self.done}, skipped {self.skipped} (already done), "
                f"failed {len(self.failed)}; {rate:.1f} images/min; mean caption {mean:.0f} characters\n"
                f"time per stage: {stages} (load+preprocess runs in a background thread, beside the rest)")


def _preprocessed(model: Model, ids: list[str], batch: int,
                  stages: dict[str, float]) -> Iterator[list[tuple[str, object]]]:
    """Batches of (id, preprocessed image or VlmError), read and prepared in a background thread.

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

    def prepared(src: str | bytes | VlmError) -> object:
        if isinstance(src, VlmError):
            return src
        try:
            return model.preprocess(src)
        except VlmError as e:
            return e

    def work() -> None:
        try:
            items, t = [], time.perf_counter()
            for image_id, src in read_images(ids):
                items.append((image_id, prepared(src)))
                if len(items) == batch:
                    stages["load+preprocess"] += time.perf_counter() - t
                    if not put(items):
                        return
                    items, t = [], time.perf_counter()
            stages["load+preprocess"] += time.perf_counter() - t
            if items:
                put(items)
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


def caption_records(model: Model, ids: list[str], prompt: str, batch: int, max_new_tokens: int,
                    stages: dict[str, float], **generate_options) -> Iterator[dict]:
    """A record for each id (a caption, or an `error`), `batch` images at a time: read and
    preprocessed in a background thread, through the vision encoder in one pass, then their
    captions decoded together. Adds each stage's seconds to `stages`."""
    for items in _preprocessed(model, ids, batch, stages):
        ready = []
        for image_id, im in items:
            if isinstance(im, VlmError):
                yield {"path": image_id, "error": str(im)}
            else:
                ready.append((image_id, im))
        if not ready:
            continue
        t = time.perf_counter()
        try:
            model.encode_images([im for _, im in ready])
        except VlmError as e:
            yield from ({"path": image_id, "error": str(e)} for image_id, _ in ready)
            continue
        stages["encode"] += time.perf_counter() - t
        yield from _captions(model, ready, prompt, max_new_tokens, stages, generate_options)


def _captions(model: Model, ready: list[tuple[str, object]], prompt: str, max_new_tokens: int,
              stages: dict[str, float], generate_options: dict) -> Iterator[dict]:
    """Records for encoded images, their captions decoded together (one image alone runs in the
    model's own session, where the prompt's text before the image stays cached)."""
    t = time.perf_counter()
    try:
        if len(ready) == 1:
            results = [model.generate(prompt, images=[ready[0][1]], max_new_tokens=max_new_tokens,
                                      **generate_options)]
        else:
            results = model.generate_batch([prompt] * len(ready), [[im] for _, im in ready],
                                           max_new_tokens=max_new_tokens, **generate_options)
    except VlmError as e:
        if len(ready) == 1:
            yield {"path": ready[0][0], "error": str(e)}
            return
        for one in ready:  # one image whose decoding fails must cost only its own caption
            yield from _captions(model, [one], prompt, max_new_tokens, stages, generate_options)
        return
    wall = time.perf_counter() - t
    prefill = sum(r.stats.prefill_s for r in results)
    stages["prefill"] += prefill
    stages["decode"] += wall - prefill
    for (image_id, _), r in zip(ready, results, strict=True):
        yield {"path": image_id, "caption": r.text.strip(), "tokens": len(r.tokens),
               "seconds": round(wall / len(ready), 3)}


RecordSource = Callable[[list[str], dict[str, float]], Iterator[dict]]


def run_captioning(source: str, output: str | os.PathLike, records: RecordSource, shard: tuple[int, int] | None,
                   progress: bool) -> CaptionSummary:
    """The driver of a captioning run, local or on Ray: lists the inputs, keeps this shard's,
    skips those already in `output`, and appends each record that `records(todo, stages)`
    yields, whole and flushed, as it arrives."""
    output = Path(output)
    ids = list(dict.fromkeys(find_images(source)))  # an image listed twice is captioned once
    mine = ids if shard is None else [i for i in ids if in_shard(i, shard)]
    repair_torn_tail(output)
    done = already_done(output)
    todo = [i for i in mine if i not in done]
    summary = CaptionSummary(skipped=len(mine) - len(todo))
    writer = ResultWriter(output)
    bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        for record in records(todo, summary.stages):
            writer.write(record)
            if "error" in record:
                summary.failed.append((record["path"], record["error"]))
                tqdm.write(f"skipped {shown(record['path'], 200)}: {record['error']}", file=sys.stderr)
            else:
                summary.done += 1
                summary.caption_chars += len(record["caption"])
            bar.update(1)
    finally:
        summary.seconds = time.perf_counter() - t0
        bar.close()
        writer.close()
    return summary


def caption(model: Model, source: str, output: str | os.PathLike, prompt: str = DEFAULT_PROMPT, batch: int = 4,
            max_new_tokens: int = 64, progress: bool = True, shard: tuple[int, int] | None = None,
            **generate_options) -> CaptionSummary:
    """Caption every image of `source` into `output` (.jsonl or .csv); returns what happened.

    `batch` images go through the encoder together and have their captions decoded together;
    `shard=(K, N)` captions only the K-th of N deterministic parts of the inputs."""
    if model.family is None:
        raise VlmError("captioning needs a vision-language model; this one has no vision encoder")
    if batch < 1:
        raise VlmError("batch must be >= 1")

    def records(todo: list[str], stages: dict[str, float]) -> Iterator[dict]:
        return caption_records(model, todo, prompt, batch, max_new_tokens, stages, **generate_options)

    return run_captioning(source, output, records, shard, progress)
