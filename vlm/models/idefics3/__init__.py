"""Idefics3 / SmolVLM: SigLIP tiles + pixel-shuffle connector in front of a Llama decoder."""

from vlm.models.idefics3.family import Idefics3Family
from vlm.models.idefics3.processor import DEFAULT_MAX_TILES, Idefics3ImageProcessor
from vlm.models.idefics3.vision import Idefics3VisionConfig, Idefics3VisionModel

__all__ = [
    "DEFAULT_MAX_TILES",
    "Idefics3Family",
    "Idefics3ImageProcessor",
    "Idefics3VisionConfig",
    "Idefics3VisionModel",
]
