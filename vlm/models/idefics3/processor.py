"""Idefics3 / SmolVLM image processing: one image -> a stack of square tiles plus its prompt shape.

Mirrors transformers' `Idefics3ImageProcessor` (PIL backend) step for step, on uint8 pixels:

1. RGB, transparent pixels composited onto white.
2. Resize (up or down; LANCZOS in the hub configs) so the longest edge is `size.longest_edge`,
   the short edge rounded up to even, both <= 4096.
3. With splitting: resize up so both sides are multiples of the tile size M
   (`max_image_size.longest_edge`); if either side exceeds M, cut rows x cols tiles of M x M
   (row-major) and append the whole image resized to M x M (the "global" tile). An image that
   already fits is one M x M tile with rows = cols = 0. Without splitting: one M x M tile.
4. x rescale_factor (in float64, as the reference), then (x - mean) / std in float32.

Beyond the reference: `max_tiles` caps the tiles per image (global tile included) for small
devices. When an image would need more, the resize target of step 2 is lowered one tile size
at a time until it fits; the default (17 = a 4 x 4 grid + global) never binds for the stock
SmolVLM / Idefics3 settings, whose largest grid is exactly 4 x 4. Per request:
`model.generate(..., max_tiles=5)`; fewer tiles = proportionally less vision time and fewer
prompt tokens (64 per tile for SmolVLM).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.image import to_rgb
from vlm.models.family import ProcessedImage
from vlm.models.settings import number, numbers, resample_filter, section, whole

# The reference never resizes past 4k on either side.
MAX_IMAGE_SIZE = 4096
# 4 x 4 tiles + the global one: the most the stock configs produce, so by default we match them.
DEFAULT_MAX_TILES = 17


def _resize_output_size_rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest edge -> max_len, aspect kept, the other edge rounded up to even (reference rule)."""
    aspect_ratio = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect_ratio)
        if height % 2 != 0:
            height += 1
    else:
        height = max_len
        width = int(height * aspect_ratio)
        if width % 2 != 0:
            width += 1
    return max(height, 1), max(width, 1)


def _resize_output_size_scale_below_upper_bound(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect_ratio = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect_ratio)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect_ratio)
    return max(height, 1), max(width, 1)


def _size_for_vision_encoder(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of the tile size, aspect kept (reference `resize_for_vision_encoder`)."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / aspect_ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * aspect_ratio)
        width = math.ceil(width / tile) * tile
    return height, width


class Idefics3ImageProcessor:
    """The reference image processor's arithmetic, configured from preprocessor_config.json values."""

    def __init__(self, longest_edge: int, tile_size: int, image_seq_len: int, do_image_splitting: bool = True,
                 resample: int = Image.Resampling.LANCZOS, rescale_factor: float = 1 / 255,
                 image_mean: tuple[float, ...] = (0.5, 0.5, 0.5), image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 max_tiles: int = DEFAULT_MAX_TILES):
        if longest_edge < 1 or tile_size < 1 or image_seq_len < 1:
            raise VlmError(f"bad image processor settings: longest_edge {longest_edge}, tile size {tile_size}, "
                           f"image_seq_len {image_seq_len}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise VlmError("image_mean and image_std must have 3 values")
        try:
            self.resample = Image.Resampling(resample)
        except ValueError:
            raise VlmError(f"unknown resample filter {resample!r} in the preprocessor config") from None
        self.longest_edge = int(longest_edge)
        self.tile_size = int(tile_size)
        self.image_seq_len = int(image_seq_len)  # `<image>` tokens per tile
        self.do_image_splitting = bool(do_image_splitting)
        self.rescale_factor = float(rescale_factor)
        self.image_mean = np.asarray(image_mean, dtype=np.float32)
        self.image_std = np.asarray(image_std, dtype=np.float32)
        self.max_tiles = _check_max_tiles(max_tiles)

    @classmethod
    def from_config(cls, config: Mapping, image_seq_len: int, default_tile_size: int,
                    max_tiles: int = DEFAULT_MAX_TILES) -> Idefics3ImageProcessor:
        """From preprocessor_config.json values; missing ones take the reference's defaults.

        `default_tile_size` stands in for a missing `max_image_size` (the vision image size).
        """
        tile = whole(section(config, "max_image_size"), "longest_edge", default_tile_size)
        longest = whole(section(config, "size"), "longest_edge", 4 * tile)
        half = (0.5, 0.5, 0.5)
        return cls(longest, tile, image_seq_len, bool(config.get("do_image_splitting", True)),
                   resample_filter(config, Image.Resampling.LANCZOS), number(config, "rescale_factor", 1 / 255),
                   numbers(config, "image_mean", half, 3), numbers(config, "image_std", half, 3, positive=True),
                   max_tiles)

    def grid(self, width: int, height: int, longest_edge: int) -> tuple[tuple[int, int], int, int]:
        """((height, width) after both resizes, rows, cols) for an image of the given size."""
        h, w = _resize_output_size_rescale_to_max_len(height, width, longest_edge)
        h, w = _resize_output_size_scale_below_upper_bound(h, w, MAX_IMAGE_SIZE)
        h, w = _size_for_vision_encoder(h, w, self.tile_size)
        if h > self.tile_size or w > self.tile_size:
            return (h, w), h // self.tile_size, w // self.tile_size
        return (h, w), 0, 0

    def plan(self, width: int, height: int, max_tiles: int) -> tuple[int, bool]:
        """(resize target for the longest edge, whether to split) that keeps within max_tiles tiles.

        The configured target when it fits, else the largest multiple of the tile size that does;
        failing all (only possible with an odd tile size), one unsplit tile.
        """
        if not self.do_image_splitting:
            return self.longest_edge, False
        m = self.tile_size
        candidates = [self.longest_edge] + [k * m for k in range(math.ceil(self.longest_edge / m) - 1, 0, -1)]
        for edge in candidates:
            _, rows, cols = self.grid(width, height, edge)
            if rows * cols + 1 <= max_tiles or rows == cols == 0:
                return edge, True
        return self.tile_size, False

    def __call__(self, image: Image.Image, max_tiles: int | None = None) -> ProcessedImage:
        """Tiles, grid, token count and cache digest of one image (see the module docstring)."""
        if not isinstance(image, Image.Image):
            raise VlmError(f"expected a PIL image, got {type(image).__name__}")
        max_tiles = self.max_tiles if max_tiles is None else _check_max_tiles(max_tiles)
        width, height = image.size
        if width < 1 or height < 1:
            raise VlmError(f"empty image ({width}x{height})")
        try:
            rgb = to_rgb(image, background=(255, 255, 255))
        except (OSError, ValueError) as e:
            raise VlmError(f"cannot convert image (mode {image.mode}) to RGB: {e}") from None

        edge, split = self.plan(width, height, max_tiles)
        m = self.tile_size
        h, w = _resize_output_size_rescale_to_max_len(height, width, edge)
        h, w = _resize_output_size_scale_below_upper_bound(h, w, MAX_IMAGE_SIZE)
        resized = self._resize(rgb, h, w)
        rows = cols = 0
        if not split:
            tiles = [self._resize(resized, m, m)]
        else:
            (h, w), rows, cols = self.grid(width, height, edge)
            resized = self._resize(resized, h, w)
            if rows:
                pixels = np.asarray(resized)
                tiles = [pixels[r:r + m, c:c + m] for r in range(0, h, m) for c in range(0, w, m)]
                tiles.append(self._resize(resized, m, m))
            else:
                tiles = [resized]
        pixel_values = np.stack([self._normalize(t) for t in tiles])

        settings = (edge, split, m, self.resample.value, self.rescale_factor, self.image_mean.tolist(),
                    self.image_std.tolist())
        digest = hashlib.sha256(f"idefics3|{width}x{height}|{settings}|".encode())
        digest.update(rgb.tobytes())
        # pixels [n_tiles, 3, M, M]: row-major tiles, then the global one; grid (0, 0): one tile only.
        return ProcessedImage(pixel_values, len(tiles) * self.image_seq_len, digest.hexdigest(), (rows, cols))

    def _resize(self, img: Image.Image, height: int, width: int) -> Image.Image:
        return img.resize((width, height), resample=self.resample)

    def _normalize(self, tile: Image.Image | np.ndarray) -> np.ndarray:
        """uint8 HWC -> float32 CHW, with the reference's exact rounding (float64 rescale, float32 rest)."""
        x = (np.asarray(tile).astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - self.image_mean) / self.image_std
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def _check_max_tiles(max_tiles: int) -> int:
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, (int, np.integer)) or max_tiles < 1:
        raise VlmError(f"max_tiles must be a positive integer, got {max_tiles!r}")
    return int(max_tiles)
