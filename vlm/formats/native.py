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

from vlm.errors import VlmError, shown
from vlm.formats.checkpoint import NATIVE_CONFIG, Checkpoint
from vlm.formats.hf import read_hf_tokenizer, read_processor_config
from vlm.formats.safetensors import read_safetensors
from vlm.memory import mapping_of
from vlm.quant import GROUP_SIZES, HalfWeight, QuantizedWeight, Weight

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


def _quantized(name: str, e: dict, arrays: dict[str, np.ndarray]) -> QuantizedWeight:
    """A quantized tensor from its entry and arrays, checked: bits, group size and the shapes of
    the packed values, scales and mins must agree, or the kernels would read out of bounds."""
    bits, group, symmetric = e.get("bits"), e.get("group_size"), e.get("symmetric")
    qweight, scales, mins = arrays.get(name + ".qweight"), arrays.get(name + ".scales"), arrays.get(name + ".mins")
    kinds = {(4, False): ("q4_asym",), (4, True): ("q4_sym", "iq4_nl"), (8, True): ("q8",)}
    allowed = kinds.get((bits, symmetric), ()) if type(bits) is int and type(symmetric) is bool else ()
    if e["kind"] not in allowed or type(group) is not int or group not in GROUP_SIZES:
        raise ValueError(f"bits {bits!r:.20}, group size {group!r:.20}, symmetric {symmetric!r:.10} "
                         f"do not make a {e['kind']!r:.20} tensor")
    if qweight is None or scales is None or qweight.ndim != 2 or scales.ndim != 2:
        raise ValueError("packed values or scales missing or not matrices")
    rows, cols = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    if (qweight.dtype != (np.uint8 if bits == 4 else np.int8) or scales.dtype != np.float16
            or cols % group or scales.shape != (rows, cols // group)):
        raise ValueError(f"packed values {qweight.shape} {qweight.dtype} and scales {scales.shape} {scales.dtype} "
                         f"disagree for {bits}-bit groups of {group}")
    if (mins is None) != symmetric or (mins is not None and (mins.shape != scales.shape or mins.dtype != np.float16)):
        raise ValueError("mins missing, unexpected or of the wrong shape")
    return QuantizedWeight(bits, group, symmetric, qweight, scales, mins, codebook=e["kind"] == "iq4_nl")


def read_native(directory: Path) -> Checkpoint:
    try:
        meta = json.loads((directory / NATIVE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise VlmError(f"corrupt {directory / NATIVE_CONFIG}: {shown(e)}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("tensors"), dict)):
        raise VlmError(f"corrupt {directory / NATIVE_CONFIG}: expected an object with 'config' and 'tensors'")
    if meta.get("format") != "vlm" or meta.get("version") != VERSION:
        raise VlmError(f"{directory} was written by an incompatible vlm (format version {shown(meta.get('version'))})")
    if not (directory / "model.safetensors").is_file():
        raise VlmError(f"{directory / 'model.safetensors'} is missing")
    arrays, _, _ = read_safetensors(directory / "model.safetensors")
    tensors: dict[str, Weight] = {}
    for name, e in meta["tensors"].items():
        try:
            if not isinstance(e, dict):
                raise ValueError("the entry is not an object")
            if e.get("kind") in ("q4_asym", "q4_sym", "iq4_nl", "q8"):
                tensors[name] = _quantized(name, e, arrays)
            elif e.get("kind") in ("f16", "bf16"):
                if arrays[name].dtype != (np.uint16 if e["kind"] == "bf16" else np.float16):
                    raise ValueError(f"stored as {arrays[name].dtype}")
                tensors[name] = HalfWeight(arrays[name], bf16=e["kind"] == "bf16")
            elif e.get("kind") == "f32" and arrays[name].dtype == np.float32:
                tensors[name] = arrays[name]
            else:
                raise ValueError(f"unknown kind {e.get('kind')!r:.20} or dtype")
        except KeyError as err:
            raise VlmError(f"corrupt converted model {directory}: tensor {shown(err)} missing") from None
        except ValueError as err:
            raise VlmError(f"corrupt converted model {directory}: tensor {shown(name)}: {shown(err, 160)}") from None
    quantization = meta.get("quantization", {})
    config = meta["config"]
    tokenizer, files = read_hf_tokenizer(directory, config)
    pre = read_processor_config(directory, files)
    mapping = mapping_of(next(iter(arrays.values()))) if arrays else None
    return Checkpoint(config, tensors, tokenizer, directory, "vlm", pre, files,
                      quantization if isinstance(quantization, dict) else {},
                      [mapping] if mapping is not None else [])
