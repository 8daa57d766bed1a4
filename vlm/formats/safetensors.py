"""Memory-mapped safetensors reading: tensors are views on the file, never copied whole.

We parse the format ourselves (8-byte header length, JSON header, raw data) because the
`safetensors` numpy API cannot return bf16 and copies what it returns.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from vlm.errors import VlmError
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
    meta = header.pop("__metadata__", {}) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    arrays, dtypes = {}, {}
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise VlmError(f"unsupported dtype {info.get('dtype')} for tensor {name} in {path}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > data.size or end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise VlmError(f"corrupt or truncated safetensors file {path} (tensor {name})")
        arrays[name] = data[begin:end].view(dtype).reshape(shape)
        dtypes[name] = info["dtype"]
    return arrays, dtypes, meta


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
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise VlmError(f"corrupt {index}: {e}") from None
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
