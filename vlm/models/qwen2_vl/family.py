"""Qwen2-VL as a vision family: preprocessing, batched vision encoding, M-RoPE positions.

The text half is a Qwen2 decoder with M-RoPE (see `text_config`); the shared runtime in vlm/runtime.py
runs it. This class provides everything image-specific, matching transformers' Qwen2-VL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.formats.checkpoint import VISION_PREFIX
from vlm.models.family import ProcessedImage, VisionFamily
from vlm.models.qwen2_vl.processor import DEFAULT_MAX_IMAGE_TOKENS, ProcessorSettings, preprocess_image
from vlm.models.qwen2_vl.vision import DEFAULT_MAX_SCORE_BYTES, Qwen2VisionTransformer, VisionConfig
from vlm.models.settings import section, whole
from vlm.prompt import Segment, TextSegment
from vlm.quant import Weight


class Qwen2VLFamily(VisionFamily):
    """Qwen2-VL's image side, plugged into the shared model glue."""

    name = "Qwen2-VL"
    image_token = "<|image_pad|>"
    image_markup = "<|vision_start|><|image_pad|><|vision_end|>"  # what mtmd writes around an image
    default_image_token_id = 151655  # Qwen2-VL-2B-Instruct's
    image_options = ("max_image_tokens",)
    # Hub names: `visual.*`, `model.*`, `lm_head.*`; transformers 5 module names: `model.visual.*`,
    # `model.language_model.*`, `lm_head.*`.
    tensor_map = {"model.visual.": VISION_PREFIX, "visual.": VISION_PREFIX, "model.language_model.": "model.",
                  "model.": "model.", "lm_head.": "lm_head."}
    text_model_type = "qwen2"
    text_defaults = {"rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                     "mrope_section": [16, 24, 24], "hidden_act": "silu"}
    # The vision tower and its config reader: what Qwen2.5-VL replaces.
    vision_config_class = VisionConfig
    vision_tower_class = Qwen2VisionTransformer

    def __init__(self, config: Mapping, vision_tensors: Mapping[str, Weight], preprocessor_config: Mapping,
                 max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS, max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES):
        super().__init__(config, vision_tensors, preprocessor_config)
        if "vision_config" not in config:
            raise VlmError(f"config.json has no vision_config: not a {self.name} checkpoint")
        self.vision_config = self.vision_config_class.from_dict(section(config, "vision_config"))
        text = self.text_config(config)
        if self.vision_config.hidden_size != text["hidden_size"]:
            raise VlmError(f"vision output width {self.vision_config.hidden_size} does not match the text "
                           f"width {text['hidden_size']}")
        self.settings = ProcessorSettings.from_config(dict(preprocessor_config))
        if (self.settings.patch_size, self.settings.merge_size) != (self.vision_config.patch_size,
                                                                    self.vision_config.spatial_merge_size):
            raise VlmError("preprocessor_config.json and config.json disagree on patch or merge size")
        self.max_image_tokens = max_image_tokens
        self.vision = self.vision_tower_class(self.vision_config, vision_tensors, max_score_bytes)

    @classmethod
    def text_overrides(cls, text: dict, config: Mapping) -> dict:
        # any head_dim key is ignored
        return {"head_dim": whole(text, "hidden_size", 0, low=0) // whole(text, "num_attention_heads", 1),
                "attention_bias": True}

    def preprocess(self, image: Image.Image, max_image_tokens: int | None = None) -> ProcessedImage:
        """Pixel patches of one image, at most about `max_image_tokens` merged tokens (default: the family's)."""
        cap = self.max_image_tokens if max_image_tokens is None else max_image_tokens
        return preprocess_image(image, self.settings, cap)

    def embed(self, images: Sequence[ProcessedImage]) -> np.ndarray:
        return self.vision(np.concatenate([im.pixels for im in images]), [im.grid for im in images])

    def positions(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """M-RoPE position ids [3, n] and rope_delta, as transformers' `get_rope_index` computes them.

        Text token: (p, p, p), p counting on from the previous token. An image's tokens:
        (s, s + row, s + col) on its merged grid, s being where the image starts; the text after it
        resumes at s + max(rows, cols). During decode every axis is cache index + rope_delta.
        """
        n = sum(len(s) for s in segments)
        pos = np.empty((3, n), dtype=np.int64)
        m = self.vision_config.spatial_merge_size
        i = cur = 0
        for s in segments:
            if isinstance(s, TextSegment):
                pos[:, i:i + len(s)] = cur + np.arange(len(s))
                cur += len(s)
            else:  # the whole image in one run (see image_slot)
                t, h, w = s.image.grid
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
                pos[:, i:i + len(s)] = cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
                cur += max(h, w) // m
            i += len(s)
        return pos, int(pos.max()) + 1 - n if n else 0
