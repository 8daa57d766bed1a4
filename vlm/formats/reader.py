"""`read_checkpoint`: any supported model file or directory, by what it holds."""

from __future__ import annotations

from pathlib import Path

from vlm.errors import VlmError
from vlm.formats.checkpoint import NATIVE_CONFIG, Checkpoint
from vlm.formats.gguf_reader import read_gguf
from vlm.formats.hf import read_hf
from vlm.formats.native import read_native


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported model file or directory, memory-mapped."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf(path)
        raise VlmError(f"unrecognised model file {path} (expected a .gguf file or a model directory)")
    if not path.is_dir():
        raise VlmError(f"model not found: {path}")
    if (path / NATIVE_CONFIG).is_file():
        return read_native(path)
    if (path / "config.json").is_file():
        return read_hf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return read_gguf(ggufs[0])
    raise VlmError(f"{path} holds no model (expected config.json, {NATIVE_CONFIG} or one .gguf file)")
