"""llama.cpp's vision projector files (mmproj GGUF, `general.architecture = clip`) as the image
side of a vision family, in Hugging Face terms.

llama.cpp ships a vision-language model as two GGUF files: the text decoder, and an mmproj
holding the vision tower and its projector. `read_mmproj` reads the second one into what a
Hugging Face checkpoint of the family would hold for its image side: the config's vision keys
(built from the `clip.vision.*` metadata and the tensors' shapes), the preprocessor config, and
the tensors under the names the family consumes. What llama.cpp's converter changed is undone:
Qwen's fused qkv, split into q, k and v, is joined again; its Conv3D patch embedding, split into
two Conv2D time slices (`v.patch_embd.weight`, `v.patch_embd.weight.1`), is stacked back. No
tensor is permuted otherwise (the converter keeps vision q/k rows in Hugging Face's order).

What the file does not say is taken as llama.cpp's mtmd takes it (tools/mtmd/clip.cpp):
Qwen-VL images hold 8 to 4096 merged tokens (its `set_limit_image_tokens(8, 4096)`; our
family's own cap, 1024 by default, applies on top), merge size 2 and a 112-px attention window
unless stored; Idefics3 resizes with Lanczos and splits into tiles.

formats/pair.py joins this with a text GGUF into one checkpoint.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm.errors import VlmError, shown
from vlm.formats.gguf import GGUFFile, _float32_value, _number
from vlm.formats.lazy import LazyTensors
from vlm.quant import HalfWeight, QuantizedWeight, Weight, dequantize

MMPROJ_GLOB = "mmproj*.gguf"  # llama.cpp's naming, and what automatic pairing looks for
QWEN_MIN_TOKENS, QWEN_MAX_TOKENS = 8, 4096  # mtmd's image token limits for Qwen-VL projectors
QWEN_WINDOW = 112  # mtmd's attention window for Qwen2.5-VL when the file stores none (pixels)
LANCZOS = 1  # PIL's Image.Resampling.LANCZOS: what mtmd resizes Idefics3 images with


@dataclass(frozen=True)
class Projector:
    """One llama.cpp projector type: the family it is, and the text GGUF architecture it pairs with."""

    model_type: str  # the family's config.json model_type (vlm.models.FAMILIES)
    text_architecture: str  # the text GGUF's general.architecture
    vision_prefix: str  # where the family's Hugging Face checkpoints keep the tower
    block_names: dict[str, str]  # v.blk.N.<name> -> the tower's block module
    global_names: dict[str, str]  # other mmproj tensors (without .weight/.bias) -> Hugging Face names


_QWEN_BLOCK = {"attn_out": "attn.proj", "ln1": "norm1", "ln2": "norm2"}
_QWEN_GLOBAL = {"v.post_ln": "merger.ln_q", "mm.0": "merger.mlp.0", "mm.2": "merger.mlp.2"}
PROJECTORS = {
    "qwen2vl_merger": Projector("qwen2_vl", "qwen2vl", "visual.",
                                {**_QWEN_BLOCK, "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}, _QWEN_GLOBAL),
    "qwen2.5vl_merger": Projector("qwen2_5_vl", "qwen2vl", "visual.",
                                  {**_QWEN_BLOCK, "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                                   "ffn_down": "mlp.down_proj"}, _QWEN_GLOBAL),
    "idefics3": Projector(
        "idefics3", "llama", "model.vision_model.",
        {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2", "ffn_up": "mlp.fc1",
         "ffn_down": "mlp.fc2"},
        {"v.patch_embd": "embeddings.patch_embedding", "v.position_embd": "embeddings.position_embedding",
         "v.post_ln": "post_layernorm", "mm.model.fc": "model.connector.modality_projection.proj"}),
}
_BLOCK = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class Mmproj:
    """The image side of a family read from an mmproj file, in a Hugging Face checkpoint's terms."""

    path: Path
    projector: str  # clip.projector_type
    model_type: str  # the family
    text_architecture: str  # the text GGUF architecture it pairs with
    config: dict  # the family config's image keys: vision_config (+ scale_factor)
    preprocessor_config: dict
    tensors: LazyTensors  # Hugging Face names, made on lookup
    out_features: int  # width of the rows the projector gives the decoder
    mappings: list = field(default_factory=list)


def find_mmproj(model: Path) -> Path | None:
    """The one `mmproj*.gguf` beside a text GGUF (automatic pairing); None when there is none;
    VlmError naming them when there are several."""
    found = sorted(p for p in model.parent.glob(MMPROJ_GLOB) if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise VlmError(f"{model.parent} holds several vision projectors ({names}); pick one with --mmproj")
    return found[0] if found else None


def _concat_rows(parts: list[Weight]) -> Weight:
    """q, k and v stacked into Qwen's fused qkv, in the form they are stored in when they share one."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    if all(isinstance(p, HalfWeight) and p.bf16 == parts[0].bf16 for p in parts):
        return HalfWeight(np.concatenate([p.data for p in parts]), parts[0].bf16)
    first = parts[0]
    if all(isinstance(p, QuantizedWeight) and (p.bits, p.group_size, p.symmetric, p.mins is None)
           == (first.bits, first.group_size, first.symmetric, first.mins is None) for p in parts):
        mins = None if first.mins is None else np.concatenate([p.mins for p in parts])
        return QuantizedWeight(first.bits, first.group_size, first.symmetric,
                               np.concatenate([p.qweight for p in parts]),
                               np.concatenate([p.scales for p in parts]), mins)
    return np.concatenate([dequantize(p) for p in parts])


def _loaders(f: GGUFFile, proj: Projector) -> tuple[dict[str, Callable[[], Any]], dict[str, tuple[int, ...]]]:
    """Hugging Face name -> loader (and shape) of every tensor in the file."""
    loaders: dict[str, Callable[[], Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    qwen = proj.model_type.startswith("qwen")

    def one(name: str) -> Weight:
        w = f.load(name)
        return w if len(w.shape) == 2 else dequantize(w)  # norms, biases, conv kernels: float32

    def fused(parts: list[str]) -> Weight:
        return _concat_rows([one(p) for p in parts])

    for name, info in f.tensors.items():
        f.check(name)
        if qwen and name.startswith("v.patch_embd."):
            continue  # the Conv3D, rebuilt below
        m = _BLOCK.fullmatch(name)
        if qwen and m and m.group(2) in ("attn_q", "attn_k", "attn_v"):
            if m.group(2) == "attn_q":  # the fused qkv, made once from its three parts
                parts = [f"v.blk.{m.group(1)}.attn_{x}.{m.group(3)}" for x in "qkv"]
                missing = [p for p in parts if p not in f.tensors]
                if missing:
                    raise VlmError(f"{f.path}: mmproj lacks tensor {missing[0]}")
                if len({f.tensors[p].shape[1:] for p in parts}) > 1:
                    raise VlmError(f"{f.path}: mmproj tensors {', '.join(parts)} differ in width")
                hf = f"{proj.vision_prefix}blocks.{m.group(1)}.attn.qkv.{m.group(3)}"
                loaders[hf] = functools.partial(fused, parts)
                shapes[hf] = (sum(f.tensors[p].shape[0] for p in parts), *info.shape[1:])
            continue
        if m and m.group(2) in proj.block_names:
            block = "blocks" if qwen else "encoder.layers"
            hf = f"{proj.vision_prefix}{block}.{m.group(1)}.{proj.block_names[m.group(2)]}.{m.group(3)}"
        else:
            base, _, kind = name.rpartition(".")
            if base not in proj.global_names or kind not in ("weight", "bias"):
                raise VlmError(f"{f.path}: unexpected tensor {shown(name)} in a {proj.model_type} mmproj")
            target = proj.global_names[base]
            hf = f"{target if target.startswith('model.') else proj.vision_prefix + target}.{kind}"
        loaders[hf] = functools.partial(one, name)
        shapes[hf] = info.shape
    if qwen:
        slices = [n for n in ("v.patch_embd.weight", "v.patch_embd.weight.1") if n in f.tensors]
        if not slices:
            raise VlmError(f"{f.path}: mmproj lacks tensor v.patch_embd.weight")
        # [out, C, P, P] per time slice -> the Conv3D kernel [out, C, T, P, P]
        kernel = f.tensors[slices[0]].shape
        if len(kernel) != 4 or any(f.tensors[n].shape != kernel for n in slices):
            raise VlmError(f"{f.path}: mmproj patch embedding has shapes "
                           f"{', '.join(str(f.tensors[n].shape) for n in slices)}, expected [out, C, P, P] each")
        hf = proj.vision_prefix + "patch_embed.proj.weight"
        loaders[hf] = lambda: np.stack([dequantize(f.load(n)) for n in slices], axis=2)
        out, ch, p, _ = kernel
        shapes[hf] = (out, ch, len(slices), p, p)
    return loaders, shapes


def _check_blocks(f: GGUFFile, width: int) -> None:
    """VlmError unless every block tensor has the shape the tower's width and block 0's MLP width
    give it (the towers take them as they come)."""
    ffn = f.tensors.get("v.blk.0.ffn_up.weight")
    ffn_rows = ffn.shape[0] if ffn is not None else None
    for name, info in f.tensors.items():
        m = _BLOCK.fullmatch(name)
        if not m:
            continue
        rows = ffn_rows if m.group(2) in ("ffn_up", "ffn_gate") else width
        want = (rows,) if m.group(3) == "bias" or m.group(2) in ("ln1", "ln2") else (
            (width, ffn_rows) if m.group(2) == "ffn_down" else (rows, width))
        if info.shape != want:
            raise VlmError(f"{f.path}: mmproj tensor {name} has shape {info.shape}, expected {want}")


def read_mmproj(path: Path) -> Mmproj:
    """Read an mmproj GGUF: projector, family config keys, preprocessor config, HF-named tensors."""
    f = GGUFFile(path)
    md = f.metadata
    if md.get("general.architecture") != "clip":
        raise VlmError(f"{f.path} is not a vision projector (mmproj) file: its architecture is "
                       f"{shown(repr(md.get('general.architecture')))}, not 'clip'")
    kind = md.get("clip.projector_type")
    if not md.get("clip.has_vision_encoder", False) or kind not in PROJECTORS:
        raise VlmError(f"{f.path}: unsupported vision projector {shown(repr(kind))} (supported: "
                       f"{', '.join(PROJECTORS)})")
    proj = PROJECTORS[kind]
    loaders, shapes = _loaders(f, proj)

    def num(key: str, default: Any = None) -> int | float:
        return _number(md, f"clip.vision.{key}", f.path, default)

    def count(key: str, default: Any = None) -> int:
        v = num(key, default)
        if not float(v).is_integer() or v < 1:
            raise VlmError(f"{f.path}: mmproj metadata clip.vision.{key} is not a whole number >= 1 ({v})")
        return int(v)

    def stats(key: str) -> list[float]:
        v = md.get(f"clip.vision.{key}")
        if not isinstance(v, np.ndarray) or v.shape != (3,):
            raise VlmError(f"{f.path}: mmproj metadata lacks clip.vision.{key} (3 numbers)")
        return [_float32_value(x) for x in v]

    def shape(hf: str) -> tuple[int, ...]:
        if hf not in shapes:
            raise VlmError(f"{f.path}: mmproj lacks the tensor that becomes {hf}")
        return shapes[hf]

    depth, width, heads = count("block_count"), count("embedding_length"), count("attention.head_count")
    patch = count("patch_size")
    _check_blocks(f, width)
    mean, std = stats("image_mean"), stats("image_std")
    eps = _float32_value(num("attention.layer_norm_epsilon", 1e-6))
    p = proj.vision_prefix
    if proj.model_type == "idefics3":
        channels = shape(p + "embeddings.patch_embedding.weight")[1]
        out = shape("model.connector.modality_projection.proj.weight")[0]
        tile = count("image_size")
        config = {"scale_factor": count("projector.scale_factor", 2),
                  "vision_config": {"hidden_size": width, "intermediate_size": count("feed_forward_length"),
                                    "num_hidden_layers": depth, "num_attention_heads": heads,
                                    "num_channels": channels, "image_size": tile, "patch_size": patch,
                                    "layer_norm_eps": eps, "hidden_act": "gelu_pytorch_tanh"}}
        pre = {"size": {"longest_edge": count("preproc_image_size", 4 * tile)},
               "max_image_size": {"longest_edge": tile}, "do_image_splitting": True, "resample": LANCZOS,
               "image_mean": mean, "image_std": std}
    else:
        out = shape(p + "merger.mlp.2.weight")[0]
        merge = count("spatial_merge_size", 2)
        _, channels, time, _, _ = shapes[p + "patch_embed.proj.weight"]
        vision = {"depth": depth, "num_heads": heads, "in_chans": channels, "patch_size": patch,
                  "temporal_patch_size": time, "spatial_merge_size": merge}
        if proj.model_type == "qwen2_vl":  # its config names: embed_dim the ViT width, hidden_size the output
            vision.update(embed_dim=width, hidden_size=out, hidden_act="quick_gelu",
                          mlp_ratio=shape(p + "blocks.0.mlp.fc1.weight")[0] / width)
        else:
            pattern = int(num("n_wa_pattern", 0))
            vision.update(hidden_size=width, out_hidden_size=out, hidden_act="silu",
                          intermediate_size=shape(p + "blocks.0.mlp.up_proj.weight")[0],
                          window_size=count("window_size", QWEN_WINDOW),
                          # llama.cpp: block i attends fully when (i + 1) % n_wa_pattern == 0; 0: all do
                          fullatt_block_indexes=[i for i in range(depth) if not pattern or (i + 1) % pattern == 0])
        config = {"vision_config": vision}
        unit = (patch * merge) ** 2  # pixels of one merged token
        pre = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": time, "image_mean": mean,
               "image_std": std, "min_pixels": QWEN_MIN_TOKENS * unit, "max_pixels": QWEN_MAX_TOKENS * unit}
    return Mmproj(Path(path), kind, proj.model_type, proj.text_architecture, config, pre,
                  LazyTensors(loaders, shapes), out, [f._map])
