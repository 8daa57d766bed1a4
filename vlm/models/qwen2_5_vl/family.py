"""Qwen2.5-VL as a vision family: Qwen2-VL's in everything but the vision tower.

Same processor (Qwen2VLImageProcessor), placeholder, checkpoint layout, Qwen2 decoder with
M-RoPE and image positions: transformers' Qwen2.5-VL `get_rope_index` differs from Qwen2-VL's
only for video (time scaled by `second_per_grid_ts` x `tokens_per_second`); a still image has
one frame at time 0 in both.
"""

from __future__ import annotations

from vlm.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer, VisionConfig
from vlm.models.qwen2_vl.family import Qwen2VLFamily


class Qwen2_5_VLFamily(Qwen2VLFamily):
    """Qwen2.5-VL's image side: Qwen2-VL's family with the windowed vision tower."""

    name = "Qwen2.5-VL"
    vision_config_class = VisionConfig
    vision_tower_class = Qwen2_5_VisionTransformer
