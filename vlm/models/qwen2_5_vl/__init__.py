"""Qwen2.5-VL: Qwen2-VL with a window-attention ViT (RMSNorm, gated SiLU MLP); same processor and decoder."""

from vlm.models.qwen2_5_vl.family import Qwen2_5_VLFamily
from vlm.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer, VisionConfig, window_order

__all__ = ["Qwen2_5_VLFamily", "Qwen2_5_VisionTransformer", "VisionConfig", "window_order"]
