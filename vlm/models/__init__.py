"""Model definitions: the shared text decoder, and one folder per vision-language family.

`FAMILIES` is the one table of vision families: config.json `model_type` -> family class.
Adding a family is its folder plus one line here (see vlm/models/family.py for the contract).
"""

from vlm.models.family import ProcessedImage, VisionFamily
from vlm.models.idefics3 import Idefics3Family
from vlm.models.qwen2_5_vl import Qwen2_5_VLFamily
from vlm.models.qwen2_vl import Qwen2VLFamily

FAMILIES: dict[str, type[VisionFamily]] = {
    "qwen2_vl": Qwen2VLFamily,
    "qwen2_5_vl": Qwen2_5_VLFamily,
    "idefics3": Idefics3Family,
    "smolvlm": Idefics3Family,  # SmolVLM2: Idefics3's layout and processing
}

__all__ = ["FAMILIES", "ProcessedImage", "VisionFamily"]
