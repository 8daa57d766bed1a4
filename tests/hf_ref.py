"""Outside references the tests share: transformers models computing with exactly the weights a
quantized vlm model holds (dequantized), their logits for vlm's prompts, and a switch onto the
numpy layers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from vlm import kernels
from vlm.formats.reader import read_checkpoint
from vlm.loader import prepare_tensors
from vlm.quant import QuantizedWeight

TEXT_TYPES = ("llama", "qwen2", "mistral")
FAMILIES = ["llama", "qwen2", "qwen2_vl", "idefics3"]  # the tiny checkpoints of conftest's tiny_model_dir
VISION = ["qwen2_vl", "idefics3"]


def image(seed: int = 0, size=(96, 72)) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def user(text: str, n_images: int = 0) -> dict:
    """A user turn, with image placeholders first."""
    if not n_images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def prompt_for(family: str) -> tuple[list[dict], list]:
    """A chat prompt (with one image for the vision families) and its images."""
    n_images = 1 if family in VISION else 0
    return [user("Why is the sky blue? Answer briefly.", n_images)], [image()] * n_images


@contextmanager
def numpy_layers() -> Iterator[None]:
    """Load and run with the numpy layers, as without the C extension (the layers check
    `kernels.AVAILABLE` when they are built and when they run)."""
    before = kernels.AVAILABLE
    kernels.AVAILABLE = False
    try:
        yield
    finally:
        kernels.AVAILABLE = before


def model_type(path: Path) -> str:
    return json.loads((Path(path) / "config.json").read_text())["model_type"]


def causal_lm_name(name: str) -> str:
    """A transformers parameter name in the causal-LM naming vlm's decoder tensors use."""
    for marker in ("language_model.", "text_model."):
        if marker in name:
            return "model." + name.split(marker, 1)[1]
    return name


def load_transformers(path: Path, quantize: str | None = None):
    """transformers' float32 model of a tiny checkpoint. With `quantize`, every decoder weight
    vlm quantizes is replaced by vlm's quantized copy, dequantized: the reference then computes
    with the very weights `vlm.load(path, quantize=...)` holds."""
    import torch
    import transformers

    torch.set_num_threads(1)
    auto = (transformers.AutoModelForCausalLM if model_type(path) in TEXT_TYPES
            else transformers.AutoModelForImageTextToText)
    hf = auto.from_pretrained(path, dtype=torch.float32).eval()
    if quantize:
        _, text, _ = prepare_tensors(read_checkpoint(path), quantize, None, 32)
        replaced = 0
        with torch.no_grad():
            for name, param in hf.named_parameters():
                key = causal_lm_name(name)
                if key in text and isinstance(text[key], QuantizedWeight):
                    param.copy_(torch.from_numpy(text[key].dequantize()))
                    replaced += 1
        assert replaced >= 8, f"only {replaced} weights matched vlm's names"
    return hf


def reference_logits(hf, path: Path, ids: list[int], images: list) -> np.ndarray:
    """transformers' logits [len(ids), vocab] for vlm's token ids (image placeholders expanded)
    and the images, preprocessed by transformers' own image processor."""
    import torch
    import transformers

    input_ids = torch.tensor([ids])
    kind = model_type(path) if Path(path).is_dir() else "llama"  # a GGUF file: a text model
    inputs = {"input_ids": input_ids}
    if kind == "qwen2_vl" and images:
        pixels = transformers.AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
        image_token = hf.config.image_token_id
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                      mm_token_type_ids=(input_ids == image_token).int())
    elif kind in ("idefics3", "smolvlm") and images:
        pixels = transformers.AutoProcessor.from_pretrained(path).image_processor(images=[images],
                                                                                  return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], pixel_attention_mask=pixels["pixel_attention_mask"])
    with torch.no_grad():
        return hf(**inputs).logits[0].float().numpy()


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())
