"""One model from two checkpoints: the decoder's tensors from a text checkpoint, the rest (image
tensors, configs, tokenizer) from another.

`pair` is the one step; its two users:

- llama.cpp's file pairs (`with_mmproj`): the text GGUF gives the decoder, the tokenizer and the
  chat template; the mmproj (formats/mmproj.py) the vision tower, its config and preprocessing.
- a Hugging Face directory whose config.json names its decoder with `"vlm_text_gguf"` (a known
  model name, or a path relative to the directory): its safetensors hold only the image side
  (vision tower + connector); the decoder's tensors come from that GGUF, everything else from
  the directory. Its text_config must agree with the GGUF's tensors.

The loader then takes the image side's tensors through the family's prefix map as usual and the
decoder's from `Checkpoint.decoder_tensors`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from vlm.errors import VlmError, shown
from vlm.formats.checkpoint import Checkpoint
from vlm.formats.lazy import shapes_of
from vlm.formats.mmproj import Mmproj
from vlm.registry import KNOWN_MODELS, resolve

TEXT_GGUF_KEY = "vlm_text_gguf"  # config.json key of a directory whose decoder is a GGUF


def decoder_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The text config values a decoder's tensors (causal-LM names) fix."""
    dims = {"num_hidden_layers": len({n.split(".")[2] for n in shapes if n.startswith("model.layers.")})}
    if "model.embed_tokens.weight" in shapes:
        dims["vocab_size"], dims["hidden_size"] = shapes["model.embed_tokens.weight"]
    if "model.layers.0.mlp.gate_proj.weight" in shapes:
        dims["intermediate_size"] = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    return dims


def pair(image: Checkpoint, text: Checkpoint) -> Checkpoint:
    """`image` with its decoder's tensors taken from `text`, a decoder-only checkpoint.

    The text config `image` declares (config.json's `text_config`) must agree with those
    tensors: VlmError naming the first value that does not.
    """
    declared = image.config.get("text_config")
    if isinstance(declared, dict):
        for key, value in decoder_dims(shapes_of(text.tensors)).items():
            if key in declared and declared[key] != value:
                raise VlmError(f"{image.path}: text_config {key} is {shown(repr(declared[key]))} but the decoder in "
                               f"{text.path} has {value}")
    return dataclasses.replace(image, decoder_tensors=text.tensors, mappings=[*image.mappings, *text.mappings],
                               sources={**image.sources, "decoder": str(text.path)})


def with_mmproj(text: Checkpoint, mm: Mmproj) -> Checkpoint:
    """A text GGUF and its mmproj as one checkpoint of the projector's family."""
    config = text.config
    # llama.cpp's qwen2vl text architecture is the one that carries M-RoPE sections
    have = "qwen2vl" if config.get("mrope_section") else config.get("model_type")
    if have != mm.text_architecture:
        raise VlmError(f"{mm.path.name} (projector {mm.projector}) pairs with a {mm.text_architecture} text "
                       f"model; {text.path.name} is {have}")
    if mm.out_features != config["hidden_size"]:
        raise VlmError(f"{mm.path.name} gives {mm.out_features}-wide image rows but the decoder of "
                       f"{text.path.name} is {config['hidden_size']} wide: they are not one model")
    family_config = {**mm.config, "model_type": mm.model_type, "text_config": dict(config),
                     "tie_word_embeddings": config["tie_word_embeddings"]}
    files = {**text.files, "preprocessor_config.json": json.dumps(mm.preprocessor_config)}  # for `vlm convert`
    image = Checkpoint(family_config, mm.tensors, text.tokenizer, text.path, text.format, mm.preprocessor_config,
                       files, mappings=mm.mappings, sources={"mmproj": str(mm.path), "projector": mm.projector})
    return pair(image, text)


def text_gguf_of(directory: Path, config: dict) -> Path:
    """The GGUF a directory's config.json names as its decoder (a known model, fetched if missing,
    or a path relative to the directory)."""
    name = config[TEXT_GGUF_KEY]
    if not isinstance(name, str) or not name:
        raise VlmError(f"{directory}/config.json: {TEXT_GGUF_KEY} must be a model name or a path, "
                       f"got {shown(repr(name))}")
    path = resolve(name) if name in KNOWN_MODELS else directory / name
    if not path.is_file():
        raise VlmError(f"{directory}/config.json: {TEXT_GGUF_KEY} names {shown(name)}, but {path} is not a file")
    return path
