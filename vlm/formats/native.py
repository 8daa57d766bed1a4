"""Our own model directory, written by `vlm convert`, read by memory map with no copying.

    DST/vlm_config.json     {"format": "vlm", "version": 1, "config": <HF config>, "tensors": {...}}
    DST/model.safetensors   packed nibbles (U8), int8, fp16 scales/mins, float tensors
    DST/tokenizer.json ...  the source's tokenizer, chat template and processor files

A quantized tensor NAME is stored as NAME.qweight, NAME.scales (and NAME.mins); its entry in
"tensors" gives bits, group_size and symmetric. Vision tensors are kept under `vision.`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from vlm.errors import VlmError
from vlm.formats.checkpoint import NATIVE_CONFIG, Checkpoint
from vlm.formats.hf import read_hf_tokenizer, read_processor_config
from vlm.formats.safetensors import read_safetensors
from vlm.memory import mapping_of
from vlm.quant import HalfWeight, QuantizedWeight, Weight

VERSION = 1


def write_native(dst: Path, config: dict, tensors: dict[str, Weight], files: dict[str, str],
                 quantization: dict) -> int:
    """Write a converted model; returns the size of its weights file in bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, w in tensors.items():
        if isinstance(w, QuantizedWeight):
            arrays[name + ".qweight"] = np.ascontiguousarray(w.qweight).reshape(w.shape[0], -1)
            arrays[name + ".scales"] = np.ascontiguousarray(w.scales)
            if w.mins is not None:
                arrays[name + ".mins"] = np.ascontiguousarray(w.mins)
            entries[name] = {"kind": w.kind, "bits": w.bits, "group_size": w.group_size, "symmetric": w.symmetric}
        elif isinstance(w, HalfWeight):
            arrays[name] = np.ascontiguousarray(w.data)
            entries[name] = {"kind": w.kind}
        else:
            arrays[name] = np.ascontiguousarray(w, dtype=np.float32)
            entries[name] = {"kind": "f32"}
    tmp = dst / "model.safetensors.part"
    save_file(arrays, str(tmp))
    tmp.replace(dst / "model.safetensors")
    for fname, text in files.items():
        (dst / fname).write_text(text, encoding="utf-8")
    meta = {"format": "vlm", "version": VERSION, "config": config, "quantization": quantization, "tensors": entries}
    (dst / NATIVE_CONFIG).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return (dst / "model.safetensors").stat().st_size


def read_native(directory: Path) -> Checkpoint:
    try:
        meta = json.loads((directory / NATIVE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VlmError(f"corrupt {directory / NATIVE_CONFIG}: {e}") from None
    if meta.get("format") != "vlm" or meta.get("version") != VERSION:
        raise VlmError(f"{directory} was written by an incompatible vlm (format version {meta.get('version')})")
    if not (directory / "model.safetensors").is_file():
        raise VlmError(f"{directory / 'model.safetensors'} is missing")
    arrays, _, _ = read_safetensors(directory / "model.safetensors")
    tensors: dict[str, Weight] = {}
    try:
        for name, e in meta["tensors"].items():
            if e["kind"] in ("q4_asym", "q4_sym", "q8"):
                tensors[name] = QuantizedWeight(e["bits"], e["group_size"], e["symmetric"], arrays[name + ".qweight"],
                                                arrays[name + ".scales"], arrays.get(name + ".mins"))
            elif e["kind"] in ("f16", "bf16"):
                tensors[name] = HalfWeight(arrays[name], bf16=e["kind"] == "bf16")
            else:
                tensors[name] = arrays[name]
    except KeyError as e:
        raise VlmError(f"corrupt converted model {directory}: tensor {e} missing") from None
    config = meta["config"]
    tokenizer, files = read_hf_tokenizer(directory, config)
    pre = read_processor_config(directory, files)
    mapping = mapping_of(next(iter(arrays.values()))) if arrays else None
    return Checkpoint(config, tensors, tokenizer, directory, "vlm", pre, files, meta.get("quantization", {}),
                      [mapping] if mapping is not None else [])
