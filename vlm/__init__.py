"""vlm: an on-device vision-language model runtime.

    import vlm
    model = vlm.load("smollm2-135m")            # or a GGUF file, an HF directory, a converted model
    print(model.generate("Why is the sky blue?").text)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from vlm.chat import Chat
from vlm.errors import VlmError
from vlm.generation import GenerationResult, GenerationStats, TextStream
from vlm.image import ImageInput
from vlm.loader import load
from vlm.registry import pull
from vlm.runtime import Model, Prompt

__version__ = "0.1.0"
__all__ = ["Chat", "GenerationResult", "GenerationStats", "Model", "TextStream", "VlmError", "generate", "load", "pull"]


@lru_cache(maxsize=2)
def _cached_load(model: str, quantize: str | None) -> Model:
    return load(model, quantize=quantize)


def generate(prompt: Prompt, model: str | os.PathLike = "smollm2-135m", images: Sequence[ImageInput] | None = None,
             quantize: str | None = None, **kwargs) -> GenerationResult | TextStream:
    """One call: load `model` (kept for the next call) and generate; kwargs as `Model.generate`."""
    return _cached_load(str(model), quantize).generate(prompt, images=images, **kwargs)
