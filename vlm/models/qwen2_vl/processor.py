"""Qwen2-VL image preprocessing: the numpy twin of transformers' `Qwen2VLImageProcessorPil`.

An image becomes `pixels` [n_patches, C * T * P * P] (1176 for Qwen2-VL) and a grid
(t=1, h, w) in patches. The steps and their arithmetic follow the reference exactly, so the
output is bit-for-bit the same:

1. RGB, with transparent pixels composited onto white (transformers 5's `convert_to_rgb`);
2. `smart_resize` to multiples of patch * merge (28) within [min_pixels, max_pixels];
3. PIL bicubic resize of the uint8 image;
4. x / 255 computed in float64 then rounded to float32, (x - mean) / std in float32;
5. the still image repeated along time (temporal_patch_size 2) and cut into patches ordered
   so that every merge x merge group of neighbouring patches is contiguous.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.image import to_rgb
from vlm.models.family import ProcessedImage
from vlm.models.settings import number, numbers, resample_filter, section, whole

# CLIP statistics: the defaults of the reference when the config leaves them out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Our cap for small devices: 1024 merged tokens = 4096 patches of 14 px, about 0.8 MP
# (896 x 896, or 672 x 1176). The checkpoint allows 16384 tokens (12.8 MP), which takes minutes
# to encode on a phone CPU and a prompt far longer than the question; 1024 keeps small text legible.
DEFAULT_MAX_IMAGE_TOKENS = 1024

MAX_ASPECT_RATIO = 200  # the reference refuses anything longer than this


@dataclass(frozen=True)
class ProcessorSettings:
    """What preprocessor_config.json says about resizing, normalising and patching."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_config(cls, cfg: dict) -> ProcessorSettings:
        """Read the hub layout (min_pixels/max_pixels) or the transformers 5 one (size dict)."""
        size = section(cfg, "size")
        d = cls()
        return cls(
            min_pixels=whole(cfg, "min_pixels", whole(size, "shortest_edge", whole(size, "min_pixels", d.min_pixels))),
            max_pixels=whole(cfg, "max_pixels", whole(size, "longest_edge", whole(size, "max_pixels", d.max_pixels))),
            patch_size=whole(cfg, "patch_size", d.patch_size),
            temporal_patch_size=whole(cfg, "temporal_patch_size", d.temporal_patch_size),
            merge_size=whole(cfg, "merge_size", d.merge_size),
            image_mean=numbers(cfg, "image_mean", d.image_mean, 3),
            image_std=numbers(cfg, "image_std", d.image_std, 3, positive=True),
            rescale_factor=number(cfg, "rescale_factor", d.rescale_factor),
            resample=resample_filter(cfg, d.resample),
        )

    @property
    def factor(self) -> int:
        """Side of one merged token in pixels (28): both resized sides are multiples of it."""
        return self.patch_size * self.merge_size

    def max_pixels_for(self, max_image_tokens: int | None) -> int:
        """The checkpoint's max_pixels, lowered so an image gives at most about `max_image_tokens`."""
        if max_image_tokens is None:
            return self.max_pixels
        if not isinstance(max_image_tokens, (int, np.integer)) or max_image_tokens < 1:
            raise VlmError(f"max_image_tokens must be a positive integer, got {max_image_tokens!r}")
        return min(self.max_pixels, int(max_image_tokens) * self.factor * self.factor)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as the reference; its ValueError for an aspect ratio above 200 is a VlmError here.
    """
    if height < 1 or width < 1:
        raise VlmError(f"empty image ({width}x{height})")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise VlmError(f"image {width}x{height} is too elongated for Qwen2-VL "
                       f"(aspect ratio {aspect:.0f}, at most {MAX_ASPECT_RATIO})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_image(image: Image.Image, settings: ProcessorSettings,
                     max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS) -> ProcessedImage:
    """Resize, normalise and patchify one image the way the reference processor does."""
    rgb = to_rgb(image, background=(255, 255, 255))
    width, height = rgb.size
    max_pixels = settings.max_pixels_for(max_image_tokens)
    new_h, new_w = smart_resize(height, width, settings.factor, settings.min_pixels, max_pixels)
    pixels = np.asarray(rgb, dtype=np.uint8)
    digest = hashlib.sha256()
    digest.update(repr((pixels.shape, new_h, new_w, settings)).encode())
    digest.update(np.ascontiguousarray(pixels))  # hashed in place, no copy of the bytes

    resized = np.asarray(rgb.resize((new_w, new_h), resample=settings.resample), dtype=np.uint8)
    # Same rounding as the reference: rescale in float64 then cast, normalise in float32.
    x = (resized.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    x = (x - np.asarray(settings.image_mean, dtype=np.float32)) / np.asarray(settings.image_std, dtype=np.float32)

    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    grid_h, grid_w = new_h // p, new_w // p
    c = x.shape[-1]
    # [H, W, C] -> [gh/m, gw/m, m, m, C, P, P]: each m x m group of patches contiguous.
    x = x.reshape(grid_h // m, m, p, grid_w // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # a still image repeated in time
    pixel_values = np.ascontiguousarray(x.reshape(grid_h * grid_w, c * t * p * p))
    # pixels [grid_t * grid_h * grid_w, C * T * P * P]; one row per merged m x m patch group.
    return ProcessedImage(pixel_values, grid_h * grid_w // (m * m), digest.hexdigest(), (1, grid_h, grid_w))
