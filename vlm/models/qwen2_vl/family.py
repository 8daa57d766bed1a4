"""Qwen2-VL as a vision family: preprocessing, batched vision encoding, prompt expansion, M-RoPE.

The text half is a Qwen2 decoder with M-RoPE (see `text_config`); the shared glue in vlm/model.py
runs it. This class provides everything image-specific, matching transformers' Qwen2-VL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.models.layers import Weight
from vlm.models.qwen2_vl.processor import (
    DEFAULT_MAX_IMAGE_TOKENS,
    ProcessedImage,
    ProcessorSettings,
    preprocess_image,
)
from vlm.models.qwen2_vl.vision import DEFAULT_MAX_SCORE_BYTES, Qwen2VisionTransformer, VisionConfig

# Hub defaults (Qwen2-VL-2B-Instruct), used when config.json leaves an id out.
IMAGE_TOKEN_ID = 151655


class Qwen2VLFamily:
    """Qwen2-VL's image side, plugged into the shared model glue."""

    name = "Qwen2-VL"
    image_token = "<|image_pad|>"
    # The vision tower and its config reader: what Qwen2.5-VL replaces.
    vision_config_class = VisionConfig
    vision_tower_class = Qwen2VisionTransformer
    # Where the checkpoint keeps each half. Hub names: `visual.*`, `model.*`, `lm_head.*`;
    # transformers 5 module names: `model.visual.*`, `model.language_model.*`, `lm_head.*`.
    # "vision": prefixes stripped to give the tower's names; "text": checkpoint prefix -> decoder prefix.
    tensor_prefixes = {
        "vision": ("model.visual.", "visual."),
        "text": {"model.language_model.": "model.", "model.": "model.", "lm_head.": "lm_head."},
    }

    def __init__(self, config: Mapping, vision_tensors: Mapping[str, Weight], preprocessor_config: Mapping,
                 max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS, max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES):
        if "vision_config" not in config:
            raise VlmError(f"config.json has no vision_config: not a {self.name} checkpoint")
        self.vision_config = self.vision_config_class.from_dict(config["vision_config"])
        text = self.text_config(config)
        if self.vision_config.hidden_size != text["hidden_size"]:
            raise VlmError(f"vision output width {self.vision_config.hidden_size} does not match the text "
                           f"width {text['hidden_size']}")
        self.image_token_id = int(config.get("image_token_id", IMAGE_TOKEN_ID))
        self.settings = ProcessorSettings.from_config(dict(preprocessor_config))
        if (self.settings.patch_size, self.settings.merge_size) != (self.vision_config.patch_size,
                                                                    self.vision_config.spatial_merge_size):
            raise VlmError("preprocessor_config.json and config.json disagree on patch or merge size")
        self.max_image_tokens = max_image_tokens
        self.vision = self.vision_tower_class(self.vision_config, vision_tensors, max_score_bytes)

    @staticmethod
    def text_config(config: Mapping) -> dict:
        """The decoder's config in the flat Qwen2 form the shared Llama/Qwen2 decoder reads.

        Handles the hub's flat config.json (text keys at the top, `rope_scaling` with mrope_section)
        and the transformers 5 one (`text_config` with `rope_parameters`).
        """
        src = dict(config.get("text_config") or config)
        rope = dict(src.get("rope_parameters") or src.get("rope_scaling") or config.get("rope_scaling") or {})
        heads = int(src["num_attention_heads"])
        tie = config.get("tie_word_embeddings", src.get("tie_word_embeddings", False))
        return {
            "model_type": "qwen2",
            "vocab_size": int(src["vocab_size"]),
            "hidden_size": int(src["hidden_size"]),
            "intermediate_size": int(src["intermediate_size"]),
            "num_hidden_layers": int(src["num_hidden_layers"]),
            "num_attention_heads": heads,
            "num_key_value_heads": int(src.get("num_key_value_heads") or heads),
            "head_dim": int(src["hidden_size"]) // heads,  # Qwen2-VL ignores any head_dim key
            "rms_norm_eps": float(src.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(rope.get("rope_theta", src.get("rope_theta", 1e6))),
            "mrope_section": list(rope.get("mrope_section", [16, 24, 24])),
            "max_position_embeddings": int(src.get("max_position_embeddings", 32768)),
            "tie_word_embeddings": bool(tie),
            "attention_bias": True,
            "hidden_act": src.get("hidden_act", "silu"),
            "bos_token_id": src.get("bos_token_id", config.get("bos_token_id")),
            "eos_token_id": src.get("eos_token_id", config.get("eos_token_id")),
        }

    @classmethod
    def split_tensors(cls, tensors: Mapping[str, Weight]) -> tuple[dict[str, Weight], dict[str, Weight]]:
        """(vision tensors without prefix, decoder tensors named `model.*` / `lm_head.*`) in either scheme."""
        vision, text = {}, {}
        for name, w in tensors.items():
            for p in cls.tensor_prefixes["vision"]:
                if name.startswith(p):
                    vision[name[len(p):]] = w
                    break
            else:
                for p, new in cls.tensor_prefixes["text"].items():
                    if name.startswith(p):
                        text[new + name[len(p):]] = w
                        break
        return vision, text

    def preprocess(self, image: Image.Image, max_image_tokens: int | None = None) -> ProcessedImage:
        """Pixel patches of one image, at most about `max_image_tokens` merged tokens (default: the family's)."""
        cap = self.max_image_tokens if max_image_tokens is None else max_image_tokens
        return preprocess_image(image, self.settings, cap)

    def encode(self, images: Sequence[ProcessedImage]) -> list[np.ndarray]:
        """All images through the vision tower in one batched pass: [n_tokens_i, text hidden] each."""
        if not images:
            return []
        out = self.vision(np.concatenate([im.pixel_values for im in images]), [im.grid_thw for im in images])
        return np.split(out, np.cumsum([im.n_tokens for im in images])[:-1])

    def expand_prompt(self, text: str, images: Sequence[ProcessedImage]) -> str:
        """Replace the i-th image placeholder by n_tokens_i copies of it, as the Qwen2-VL processor does."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(images):
            raise VlmError(f"the prompt has {len(parts) - 1} image placeholder(s) but {len(images)} image(s) "
                           "were given")
        out = [parts[0]]
        for im, part in zip(images, parts[1:], strict=True):
            out += [self.image_token * im.n_tokens, part]
        return "".join(out)

    def positions(self, ids: np.ndarray, images: Sequence[ProcessedImage]) -> tuple[np.ndarray, int]:
        """M-RoPE position ids [3, n] and rope_delta, as transformers' `get_rope_index` computes them.

        Text token: (p, p, p), p counting on from the previous token. An image's tokens:
        (s, s + row, s + col) on its merged grid, s being where the image starts; the text after it
        resumes at s + max(rows, cols). During decode every axis is cache index + rope_delta.
        """
        ids = np.asarray(ids)
        n = ids.size
        pos = np.empty((3, n), dtype=np.int64)
        m = self.vision_config.spatial_merge_size
        is_image = ids == self.image_token_id
        queue = list(images)
        i = cur = 0
        while i < n:
            if not is_image[i]:
                rest = is_image[i:]
                j = i + int(rest.argmax()) if rest.any() else n
                pos[:, i:j] = cur + np.arange(j - i)
                cur += j - i
                i = j
                continue
            if not queue:
                raise VlmError("the prompt has more image tokens than the images provide")
            t, h, w = queue.pop(0).grid_thw
            gh, gw = h // m, w // m
            size = t * gh * gw
            if i + size > n or not is_image[i:i + size].all():
                raise VlmError("the image tokens in the prompt do not match the images' sizes")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, i:i + size] = cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
            cur += max(h, w) // m
            i += size
        if queue:
            raise VlmError(f"{len(queue)} image(s) have no image tokens in the prompt")
        return pos, int(pos.max()) + 1 - n if n else 0
