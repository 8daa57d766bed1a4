"""`vlm.load`: from a path or a known name to a ready `Model`, quantizing on the way if asked."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import numpy as np

from vlm import kernels
from vlm.errors import VlmError, shown
from vlm.formats.checkpoint import VISION_PREFIX, Checkpoint
from vlm.formats.lazy import LazyTensors, shapes_of
from vlm.formats.reader import read_checkpoint
from vlm.memory import release_pages
from vlm.models import FAMILIES
from vlm.models.llama import SUPPORTED as TEXT_ARCHITECTURES
from vlm.models.llama import LlamaModel, TextConfig
from vlm.quant import (
    GROUP_SIZES,
    QUANTIZE_MODES,
    VISION_MODES,
    HalfWeight,
    QuantizedWeight,
    Weight,
    can_quantize,
    dequantize,
    quantize,
    relative_rms_error,
    stored_arrays,
)
from vlm.registry import resolve
from vlm.runtime import Model
from vlm.session import KV_CACHE_DTYPES

MAX_THREADS = 1024  # more would only exhaust the system's thread limit

_DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
# A LoRA adapter of a decoder matrix, as PEFT names its halves: lora_A [rank, in], lora_B [out, rank]
_ADAPTER = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_([AB])\.weight$")


def quantize_decoder(tensors: Mapping[str, Weight], mode: str | None, group_size: int = 32,
                     errors: dict[str, float] | None = None) -> LazyTensors:
    """Apply a precision mode to decoder tensors named as in HF causal LMs.

    q4 / q4_sym: every linear layer 4-bit, embeddings 8-bit; q8: both 8-bit; f32: all float32;
    None: as stored. Norms and biases are always float32. A matrix whose width is not a
    multiple of the group size stays as it is. Each tensor is converted when it is looked up
    (see LazyTensors); with `errors`, the relative RMS error of each tensor quantized is then
    recorded in it.
    """
    mode_bits = {"q4": 4, "q4_sym": 4, "q8": 8}.get(mode)

    def convert(name: str) -> Weight:
        w = tensors[name]
        if len(w.shape) < 2 or mode == "f32":
            return dequantize(w)
        linear = bool(_DECODER_LINEAR.match(name)) or name == "lm_head.weight"
        embedding = name == "model.embed_tokens.weight"
        if not (mode_bits and (linear or embedding) and can_quantize(w.shape, group_size)):
            return w
        bits = 8 if embedding else mode_bits
        if _already(w, bits, group_size):
            return w
        q = quantize(w, bits, group_size, symmetric=(mode == "q4_sym"))
        if errors is not None:
            errors[name] = relative_rms_error(w, q)
        release_pages(*stored_arrays(w))  # the source was read once, to quantize
        return q

    return LazyTensors({name: functools.partial(convert, name) for name in tensors}, shapes_of(tensors))


def _already(w: Weight, bits: int, group_size: int) -> bool:
    """A tensor already at this precision is kept (a Q4_1 GGUF is not re-quantized)."""
    return isinstance(w, QuantizedWeight) and w.bits == bits and w.group_size <= group_size


def convert_vision(tensors: Mapping[str, Weight], mode: str | None) -> LazyTensors:
    """Precision of the vision tower: f32, f16 storage, or 8-bit linear weights (mixed
    precision; tables such as learned position embeddings stay float: they are added, not
    multiplied, so 8 bits would cost accuracy and save no time). Each tensor is converted when
    it is looked up."""

    def convert(name: str) -> Weight:
        w = tensors[name]
        matrix = len(w.shape) == 2
        if mode is None and (not isinstance(w, np.ndarray) or w.dtype == np.float32):
            return w if matrix else dequantize(w)
        if mode == "f16" and matrix:
            return w if isinstance(w, HalfWeight) and not w.bf16 else HalfWeight(dequantize(w).astype(np.float16))
        if mode == "q8" and matrix and can_quantize(w.shape, 32) and not name.endswith("embedding.weight"):
            return w if isinstance(w, QuantizedWeight) else quantize(w, 8, 32)
        return dequantize(w)

    return LazyTensors({name: functools.partial(convert, name) for name in tensors})


def family_class(config: dict, path) -> type | None:
    """The vision family of a config, None for a text-only decoder; unsupported -> VlmError."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str | None):
        raise VlmError(f"bad model config in {path}: model_type is {shown(repr(model_type))}")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type not in TEXT_ARCHITECTURES:
        known = ", ".join(sorted([*TEXT_ARCHITECTURES, *FAMILIES]))
        raise VlmError(f"unsupported architecture {shown(repr(model_type))} in {path}; supported: {known}")
    return None


def split_tensors(ckpt: Checkpoint, family_cls) -> tuple[dict, dict, dict]:
    """(vision tensors with the family's prefixes stripped, decoder tensors in causal-LM names,
    LoRA adapters of the decoder).

    A converted directory already stores them apart: vision tensors under `vision.`. Adapters come
    with a pair whose decoder is another file's: the image side may hold them, nothing else of the
    decoder.
    """
    if ckpt.format == "vlm":
        vision = {k[len(VISION_PREFIX):]: w for k, w in ckpt.tensors.items() if k.startswith(VISION_PREFIX)}
        return vision, {k: w for k, w in ckpt.tensors.items() if not k.startswith(VISION_PREFIX)}, {}
    if family_cls is None:
        return {}, ckpt.tensors, {}
    vision, text = family_cls.split_tensors(ckpt.tensors)
    if ckpt.decoder_tensors is None:
        return vision, text, {}
    # a pair (formats/pair.py): the decoder is another file's
    adapters = {k: w for k, w in text.items() if _ADAPTER.match(k)}
    if len(adapters) < len(text):
        name = next(k for k in text if k not in adapters)
        raise VlmError(f"{ckpt.path} holds decoder tensors ({shown(name)}, ...) but its decoder comes from "
                       f"{ckpt.sources['decoder']}; remove them")
    return vision, ckpt.decoder_tensors, adapters


def merge_adapters(decoder: Mapping[str, Weight], adapters: Mapping[str, Weight], exact: bool,
                   where: object) -> LazyTensors:
    """The decoder with LoRA adapters merged: W + B A for each adapted matrix (no further scale),
    in float32 if `exact` or W is a float matrix (or its width no multiple of 32), else 8-bit in
    groups of 32: a 4-bit grid would round much of the adapters' change away. Made when looked
    up, as the other tensors."""
    halves: dict[str, dict[str, Weight]] = {}
    for name, w in adapters.items():
        target, half = _ADAPTER.match(name).groups()
        halves.setdefault(target + ".weight", {})[half] = w
    shapes = shapes_of(decoder)
    for target, ab in halves.items():
        if target not in shapes or len(ab) < 2:
            missing = "matrix" if target not in shapes else "lora_B" if "A" in ab else "lora_A"
            raise VlmError(f"{where}: the adapter of {shown(target)} has no {missing}")
        (rank, cols), (rows, rank_b) = ab["A"].shape, ab["B"].shape
        if (rank, (rows, cols)) != (rank_b, shapes[target]):
            raise VlmError(f"{where}: the adapter of {shown(target)} is lora_A {ab['A'].shape}, lora_B "
                           f"{ab['B'].shape}; the matrix is {shapes[target]}")

    def merged(name: str) -> Weight:
        w = decoder[name]
        if name not in halves:
            return w
        full = dequantize(w) + dequantize(halves[name]["B"]) @ dequantize(halves[name]["A"])
        release_pages(*stored_arrays(w))
        if exact or not isinstance(w, QuantizedWeight) or not can_quantize(full.shape, 32):
            return full
        return quantize(full, 8, 32)

    return LazyTensors({name: functools.partial(merged, name) for name in decoder}, shapes)


def prepare_tensors(ckpt: Checkpoint, quantize: str | None, vision_quantize: str | None, group_size: int,
                    errors: dict[str, float] | None = None) -> tuple[type | None, LazyTensors, LazyTensors]:
    """Validate the precision settings; returns (family class, decoder tensors, vision tensors) at
    them, each made when looked up."""
    if quantize not in QUANTIZE_MODES:
        raise VlmError(f"quantize must be one of {', '.join(map(str, QUANTIZE_MODES))}; got {quantize!r}")
    if vision_quantize not in VISION_MODES:
        raise VlmError(f"vision precision must be one of {', '.join(map(str, VISION_MODES))}; got {vision_quantize!r}")
    if group_size not in GROUP_SIZES:
        raise VlmError(f"group size must be one of {GROUP_SIZES}; got {group_size}")
    family_cls = family_class(ckpt.config, ckpt.path)
    vision, text, adapters = split_tensors(ckpt, family_cls)
    if adapters:
        text = merge_adapters(text, adapters, exact=quantize is not None, where=ckpt.path)
    vision_mode = "f32" if quantize == "f32" else vision_quantize
    return (family_cls, quantize_decoder(text, quantize, group_size, errors), convert_vision(vision, vision_mode))


def image_config(ckpt: Checkpoint, family_cls: type) -> dict:
    """The config the family is built from: without an `image_token_id` (an mmproj pair, or a
    config that leaves it out), the id the tokenizer gives the family's placeholder."""
    token_id = ckpt.tokenizer.tok.token_to_id(family_cls.image_token)
    if "image_token_id" in ckpt.config or token_id is None:
        return ckpt.config
    return {**ckpt.config, "image_token_id": token_id}


def build_model(ckpt: Checkpoint, quantize: str | None = None, vision_quantize: str | None = None,
                group_size: int = 32, context: int | None = None, prefill_chunk: int = 256,
                kv_cache: str | None = None) -> Model:
    """Assemble a Model from a checkpoint, applying the requested precisions."""
    family_cls, text, vision = prepare_tensors(ckpt, quantize, vision_quantize, group_size)
    config = TextConfig.from_dict(family_cls.text_config(ckpt.config) if family_cls else ckpt.config)
    kv_cache = kv_cache or ("f32" if quantize == "f32" else "f16")  # f32 keeps exact math exact
    if kv_cache not in KV_CACHE_DTYPES:
        raise VlmError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache!r}")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 16):
        raise VlmError(f"context must be a whole number of at least 16 tokens, got {context!r:.40}")
    if context is None:
        context = min(4096, config.max_position_embeddings) if isinstance(config.max_position_embeddings, int) else 0
    config.validate(shapes_of(text), context, np.dtype(KV_CACHE_DTYPES[kv_cache]).itemsize)
    decoder = LlamaModel(config, text)
    family = family_cls(image_config(ckpt, family_cls), vision, ckpt.preprocessor_config) if family_cls else None
    model_type = ckpt.config.get("model_type")
    info = {"path": str(ckpt.path), "format": ckpt.format, "architecture": model_type, "quantize": quantize,
            "kv_cache": kv_cache, **ckpt.sources}
    return Model(decoder, ckpt.tokenizer, family, context=context, prefill_chunk=prefill_chunk, info=info,
                 kv_cache=kv_cache)


def load(model: str | os.PathLike = "smollm2-135m", quantize: str | None = None, threads: int | None = None,
         context: int | None = None, prefill_chunk: int = 256, group_size: int = 32,
         vision_quantize: str | None = None, kv_cache: str | None = None,
         mmproj: str | os.PathLike | None = None) -> Model:
    """Load a model from a GGUF file, a Hugging Face directory, a `vlm convert` directory or a known name.

    mmproj: llama.cpp's vision projector file for a GGUF text model (default: the one
    `mmproj*.gguf` in the text file's folder, if there is exactly one).

    quantize: None keeps what the file holds; "q4" (asymmetric, like Q4_1), "q4_sym" (like Q4_0)
    or "q8" quantize the decoder on load; "f32" widens everything to float32 (exact math).
    vision_quantize picks the vision tower's precision (None: as stored; "f32", "f16", "q8").
    context is the KV cache size in tokens (default: the model's, at most 4096); kv_cache its
    precision, "f16" or "f32" (default: f16, or f32 with quantize="f32").
    """
    if threads is not None and (not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS):
        raise VlmError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r:.40}")
    kernels.set_threads(threads)
    ckpt = read_checkpoint(resolve(model), mmproj)
    built = build_model(ckpt, quantize, vision_quantize, group_size, context, prefill_chunk, kv_cache)
    ckpt.release_pages()
    kernels.release_free_memory()
    return built
