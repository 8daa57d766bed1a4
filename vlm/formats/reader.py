"""`read_checkpoint`: any supported model file or directory, by what it holds."""

from __future__ import annotations

import os
from pathlib import Path

from vlm.errors import VlmError
from vlm.formats.checkpoint import NATIVE_CONFIG, Checkpoint
from vlm.formats.gguf_reader import read_gguf
from vlm.formats.hf import read_hf
from vlm.formats.mmproj import MMPROJ_GLOB, find_mmproj, read_mmproj
from vlm.formats.native import read_native
from vlm.formats.pair import TEXT_GGUF_KEY, pair, text_gguf_of, with_mmproj


def read_checkpoint(path: str | Path, mmproj: str | os.PathLike | None = None) -> Checkpoint:
    """Read any supported model file or directory, memory-mapped.

    A GGUF text model is paired with `mmproj` (llama.cpp's vision projector file: a path, or a
    file name in the text model's folder), or else with the one `mmproj*.gguf` beside it; a
    Hugging Face directory with `vlm_text_gguf` in its config.json with that GGUF's decoder
    (formats/pair.py).
    """
    path = Path(path)
    if path.is_dir() and not (path / NATIVE_CONFIG).is_file() and not (path / "config.json").is_file():
        projectors = set(path.glob(MMPROJ_GLOB))
        ggufs = sorted(p for p in path.glob("*.gguf") if p not in projectors)
        if len(ggufs) != 1:
            raise VlmError(f"{path} holds no model (expected config.json, {NATIVE_CONFIG} or one .gguf file "
                           f"besides any {MMPROJ_GLOB})")
        path = ggufs[0]
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise VlmError(f"unrecognised model file {path} (expected a .gguf file or a model directory)")
        text = read_gguf(path)
        projector = find_mmproj(path) if mmproj is None else Path(mmproj)
        if mmproj is not None and not projector.exists() and (path.parent / projector).is_file():
            projector = path.parent / projector  # a file name beside the text model (in a hub snapshot, say)
        return with_mmproj(text, read_mmproj(projector)) if projector is not None else text
    if not path.is_dir():
        raise VlmError(f"model not found: {path}")
    if mmproj is not None:
        raise VlmError(f"an mmproj pairs with a GGUF text model; {path} is a model directory")
    if (path / NATIVE_CONFIG).is_file():
        return read_native(path)
    ckpt = read_hf(path)
    if TEXT_GGUF_KEY in ckpt.config:
        return pair(ckpt, read_gguf(text_gguf_of(path, ckpt.config)))
    return ckpt
