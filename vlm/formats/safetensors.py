"""Memory-mapped safetensors reading: tensors are views on the file, never copied whole.

We parse the format ourselves (8-byte header length, JSON header, raw data) because the
`safetensors` numpy API cannot return bf16 and copies what it returns.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from vlm.errors import VlmError, shown
from vlm.memory import mapping_of
from vlm.quant import HalfWeight

DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
}


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """Views of every tensor in one file, their dtype names, and the file's __metadata__.

    The views share one np.memmap; `mapping_of(view)` finds its mmap."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise VlmError(f"corrupt safetensors file {path}: too short")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise VlmError(f"corrupt safetensors file {path}: bad header length")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmError(f"cannot read safetensors file {path}: {e}") from None
    if not isinstance(header, dict):
        raise VlmError(f"corrupt safetensors file {path}: the header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    arrays, dtypes = {}, {}
    for name, info in header.items():
        where = f"corrupt or truncated safetensors file {path} (tensor {shown(name)})"
        begin, end, shape = _entry(info, data.size, where)
        dtype = DTYPES[info["dtype"]]
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise VlmError(where)
        arrays[name] = data[begin:end].view(dtype).reshape(shape)
        dtypes[name] = info["dtype"]
    return arrays, dtypes, meta


def _entry(info: object, data_size: int, where: str) -> tuple[int, int, tuple[int, ...]]:
    """(begin, end, shape) of one header entry, checked: a crafted header must not reach numpy."""
    if not isinstance(info, dict):
        raise VlmError(f"{where}: the entry is not a JSON object")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES:
        raise VlmError(f"{where}: unsupported dtype {shown(repr(info.get('dtype')))}")
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(v) for v in offsets)
            and offsets[0] <= offsets[1] <= data_size):
        raise VlmError(f"{where}: bad data_offsets {shown(repr(offsets))}")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_natural(v) for v in shape)):
        raise VlmError(f"{where}: bad shape {shown(repr(shape))}")
    return offsets[0], offsets[1], tuple(shape)


def _natural(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def as_weight(array: np.ndarray, dtype: str) -> np.ndarray | HalfWeight:
    """A stored tensor as a layer weight: 16-bit floats stay 16-bit (widened on use)."""
    if dtype == "F16":
        return HalfWeight(array)
    if dtype == "BF16":
        return HalfWeight(array, bf16=True)
    return array


def read_checkpoint_tensors(directory: Path) -> tuple[dict[str, np.ndarray | HalfWeight], list]:
    """All tensors of a Hugging Face checkpoint directory (single file or shards), and the file maps."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise VlmError(f"no .safetensors files in {directory} (PyTorch .bin checkpoints are not supported)")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            if not all(isinstance(n, str) and "/" not in n for n in names):
                raise ValueError("weight_map names a file outside the directory")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise VlmError(f"corrupt {index}: {shown(e)}") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise VlmError(f"checkpoint shard missing: {directory / missing[0]}")
        files = [directory / n for n in sorted(names)]
    tensors, mappings = {}, []
    for f in files:
        arrays, dtypes, _ = read_safetensors(f)
        for name, a in arrays.items():
            tensors[name] = as_weight(a, dtypes[name])
        if arrays:
            mappings.append(mapping_of(next(iter(arrays.values()))))
    return tensors, [m for m in mappings if m is not None]
