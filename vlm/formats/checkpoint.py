"""One in-memory form for every model file we read: Hugging Face directories, GGUF files and
our own converted directories all become a `Checkpoint` (HF config keys, HF tensor names).

The readers: formats/hf.py, formats/gguf_reader.py, formats/native.py; `read_checkpoint` in
formats/reader.py picks one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import VlmError, shown
from vlm.memory import release_mappings
from vlm.quant import Weight
from vlm.tokenizer import Tokenizer

NATIVE_CONFIG = "vlm_config.json"  # marks a directory written by `vlm convert`
VISION_PREFIX = "vision."  # our name for the image side's tensors (converted directories store them so)


@dataclass
class Checkpoint:
    config: dict  # config.json as Hugging Face writes it
    tensors: Mapping[str, Weight]  # Hugging Face tensor names (a GGUF file's: made on lookup)
    tokenizer: Tokenizer
    path: Path
    format: str  # "hf", "gguf" or "vlm"
    preprocessor_config: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # tokenizer/processor files to carry on convert
    quantization: dict = field(default_factory=dict)
    mappings: list = field(default_factory=list)  # mmap objects of the weight files
    # A pair (formats/pair.py): the decoder's tensors, in causal-LM names, from another file than
    # `tensors` (then the image side only); `sources` says where each part came from.
    decoder_tensors: Mapping[str, Weight] | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def release_pages(self) -> None:
        """Drop the file pages this process has touched (repacking reads every weight once).

        They are clean file pages: whatever is still used faults back in on demand, so the
        resident set stays close to the weights actually held.
        """
        release_mappings(self.mappings)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: invalid UTF-8
        raise VlmError(f"cannot read {path}: {shown(e)}") from None


def read_json(path: Path) -> dict:
    """A JSON file that must hold an object (config, tokenizer_config...)."""
    try:
        value = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        raise VlmError(f"cannot read {path}: {shown(e)}") from None
    if not isinstance(value, dict):
        raise VlmError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
