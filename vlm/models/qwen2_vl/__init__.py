"""Qwen2-VL: dynamic-resolution ViT with 2D rotary, 2x2 patch merging, Qwen2 decoder with M-RoPE."""

from vlm.models.qwen2_vl.family import Qwen2VLFamily
from vlm.models.qwen2_vl.processor import (
    DEFAULT_MAX_IMAGE_TOKENS,
    ProcessorSettings,
    preprocess_image,
    smart_resize,
)
from vlm.models.qwen2_vl.vision import Qwen2VisionTransformer, VisionConfig

__all__ = [
    "DEFAULT_MAX_IMAGE_TOKENS",
    "ProcessorSettings",
    "Qwen2VLFamily",
    "Qwen2VisionTransformer",
    "VisionConfig",
    "preprocess_image",
    "smart_resize",
]
