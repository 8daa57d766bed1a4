"""The Idefics3 family (SmolVLM-256M/500M-Instruct, SmolVLM2, Idefics3-8B): what the model glue needs.

A checkpoint's config.json has `model_type: idefics3` (SmolVLM2: `smolvlm`, the same layout and
image processing; its video input is not supported) with nested `vision_config` (SigLIP) and
`text_config` (Llama); its tensors live under `model.vision_model.`, `model.connector.`,
`model.text_model.` and `lm_head.` (the hub checkpoints and transformers 5 `save_pretrained`
alike). Each `<image>` of the chat template expands to tiles of `<image>` tokens (see
`expand_prompt`); the decoder uses plain 1-D positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.models.idefics3.processor import DEFAULT_MAX_TILES, Idefics3ImageProcessor, ProcessedImage
from vlm.models.idefics3.vision import DEFAULT_CHUNK_TOKENS, Idefics3VisionConfig, Idefics3VisionModel
from vlm.models.layers import Weight
from vlm.prompt import ImageSlot, Segment, text_positions

# Defaults of transformers' LlamaConfig, except rms_norm_eps, which Idefics3Config sets to 1e-5.
_LLAMA_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "hidden_act": "silu", "attention_bias": False,
}


class Idefics3Family:
    """Preprocessing, vision encoding and prompt expansion for Idefics3 checkpoints.

    `preprocessor_config` is preprocessor_config.json merged with processor_config.json (either
    may be empty; a nested "image_processor" section, as some processor_config.json files carry,
    is read too). Missing values fall back to the reference's defaults, and tile sizes to the
    legacy `vision_config.max_image_size` / `size` of the hub configs.
    """

    image_token = "<image>"
    fake_image_token = "<fake_token_around_image>"
    global_image_token = "<global-img>"
    # Checkpoint prefix of each part. `vision_tensors` are the "vision" and "connector" tensors
    # with these prefixes removed; the decoder's names are "text" -> "model.", "lm_head." kept
    # (see `split_tensors`).
    tensor_prefixes = {
        "vision": "model.vision_model.",
        "connector": "model.connector.",
        "text": "model.text_model.",
        "lm_head": "lm_head.",
    }

    def __init__(self, config: Mapping, vision_tensors: Mapping[str, Weight], preprocessor_config: Mapping,
                 max_tiles: int = DEFAULT_MAX_TILES, max_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        vision = dict(config.get("vision_config") or {})
        self.vision_config = Idefics3VisionConfig.from_dict(vision)
        self.scale_factor = int(config.get("scale_factor", 2))
        self.image_token_id = int(config.get("image_token_id", 128257))
        self.vision = Idefics3VisionModel(self.vision_config, self.scale_factor, vision_tensors,
                                          max_chunk_tokens)

        pre = {**vision, **preprocessor_config, **(preprocessor_config.get("image_processor") or {})}
        pre.setdefault("max_image_size", {"longest_edge": self.vision_config.image_size})
        tile = pre["max_image_size"].get("longest_edge", self.vision_config.image_size)
        self.image_seq_len = self.vision.tokens_per_tile(tile)
        declared = pre.get("image_seq_len", self.image_seq_len)
        if declared != self.image_seq_len:
            raise VlmError(f"processor image_seq_len {declared} does not match the vision tower's "
                           f"{self.image_seq_len} tokens per {tile}-px tile")
        self.processor = Idefics3ImageProcessor.from_config(pre, self.image_seq_len, tile, max_tiles)

    # --- static facts about a checkpoint ------------------------------------------------------

    @staticmethod
    def text_config(config: Mapping) -> dict:
        """The decoder's config as a Hugging Face Llama config dict."""
        text = dict(config.get("text_config") or {})
        if text.get("model_type", "llama") != "llama":
            raise VlmError(f"unsupported Idefics3 text model {text.get('model_type')!r} (expected llama)")
        out = {**_LLAMA_DEFAULTS, **text, "model_type": "llama"}
        rope = out.get("rope_parameters") or out.get("rope_scaling") or {}
        out["rope_theta"] = rope.get("rope_theta", out["rope_theta"])
        out.setdefault("num_key_value_heads", out["num_attention_heads"])
        if out.get("head_dim") is None:
            out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
        # transformers ties lm_head by the outer config's flag (Idefics3Config defaults it off).
        out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
        return out

    @classmethod
    def split_tensors(cls, tensors: Mapping[str, Weight]) -> tuple[dict[str, Weight], dict[str, Weight]]:
        """(vision_tensors for the constructor, decoder tensors named as `vlm.models.llama` expects)."""
        p = cls.tensor_prefixes
        vision, text = {}, {}
        for name, t in tensors.items():
            if name.startswith(p["vision"]):
                vision[name[len(p["vision"]):]] = t
            elif name.startswith(p["connector"]):
                vision[name[len(p["connector"]):]] = t
            elif name.startswith(p["text"]):
                text["model." + name[len(p["text"]):]] = t
            elif name.startswith(p["lm_head"]):
                text[name] = t
        return vision, text

    # --- per request ------------------------------------------------------------------------

    def preprocess(self, image: Image.Image, max_tiles: int | None = None) -> ProcessedImage:
        """Tiles of one image, at most `max_tiles` (default: the family's, 17) counting the global one."""
        return self.processor(image, max_tiles)

    def encode(self, images: Sequence[ProcessedImage]) -> list[np.ndarray]:
        """Features [n_tokens_i, text_hidden] per image, from one batched pass over all their tiles."""
        if not images:
            return []
        feats = self.vision(np.concatenate([im.pixel_values for im in images]))
        out, start = [], 0
        for im in images:
            # A copy, so a cached image's features do not pin the whole batch's array.
            out.append(feats[start:start + im.n_tiles].reshape(-1, feats.shape[-1]).copy())
            start += im.n_tiles
        return out

    def image_slot(self, image: ProcessedImage) -> ImageSlot:
        """What one `<image>` placeholder stands for (`Idefics3Processor.replace_image_token`):
        each tile's rows after a row/column marker, then the global view's."""
        fake, rows = self.fake_image_token, self.image_seq_len
        slot: ImageSlot = []
        for r in range(1, image.rows + 1):
            for c in range(1, image.cols + 1):
                slot += [f"{fake}<row_{r}_col_{c}>", rows]
            slot.append("\n")
        if image.rows:
            slot.append("\n")
        return slot + [f"{fake}{self.global_image_token}", rows, fake]

    def positions(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """Decoder positions for a prompt: plain 0..n-1, and rope_delta 0 (no multimodal RoPE)."""
        return text_positions(segments)
