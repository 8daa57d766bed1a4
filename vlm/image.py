"""Opening images from anything a user hands us, with one clear error for anything unusable."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlm.errors import VlmError, shown

# Larger than any camera photo, small enough that decoding cannot exhaust a small device.
MAX_IMAGE_PIXELS = 100_000_000

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

# Our own cap (checked from the header, before decoding) replaces Pillow's decompression-bomb
# warning, a multi-line message meant for developers. Pillow's error, above twice its own
# limit, is still turned into a one-line VlmError.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def image_list(images: ImageInput | Sequence[ImageInput] | None) -> list:
    """The images of a request as a list: one path, bytes, PIL image or array is ONE image
    (a bare string must not be split into characters); None is none."""
    if images is None:
        return []
    if isinstance(images, str | os.PathLike | bytes | Image.Image | np.ndarray):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise VlmError(f"images must be a list of images, got {type(images).__name__}") from None


def load_image(src: ImageInput) -> Image.Image:
    """Open and fully decode an image from a path, encoded bytes, a PIL image or an HxW(xC) array.

    Raises VlmError (one line) for a missing, non-image, truncated, empty or oversized input,
    and for anything else that goes wrong while decoding: a decoder library can raise any
    exception on a crafted file (Pillow: NotImplementedError for some DDS variants), and one
    bad image must cost only its own result. The image keeps its mode; `to_rgb` converts it
    the way a family's processor wants.
    """
    if not isinstance(src, ImageInput):
        raise VlmError(f"an image must be a path, bytes, a PIL image or an array; got {type(src).__name__}")
    name = "image bytes" if isinstance(src, bytes) else "image array" if isinstance(src, np.ndarray) else \
        "PIL image" if isinstance(src, Image.Image) else shown(src, 200)
    with image_errors(name):
        img = _decoded(src, name)
    w, h = img.size
    if w < 1 or h < 1:
        raise VlmError(f"empty image ({w}x{h})")
    return img


@contextlib.contextmanager
def image_errors(name: str = "") -> Iterator[None]:
    """Turns any exception raised while decoding or preprocessing an image into one VlmError."""
    what = f"image {name}" if name else "image"
    try:
        yield
    except VlmError:
        raise
    except Image.DecompressionBombError:
        raise VlmError(f"{what} too large (limit {MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise VlmError(f"not an image file: {name or 'image bytes'}") from None
    except MemoryError:
        raise VlmError(f"out of memory decoding {what}") from None
    except Exception as e:
        raise VlmError(f"cannot read {what}: {type(e).__name__}: {shown(e)}") from None


def _decoded(src: ImageInput, name: str) -> Image.Image:
    if isinstance(src, np.ndarray):
        img = _from_array(src)
    elif isinstance(src, Image.Image):
        img = src
    elif not isinstance(src, bytes) and not Path(src).is_file():
        raise VlmError(f"image not found: {name}")
    else:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    # The header gives the size: refuse a huge image before decoding (allocating) it.
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise VlmError(f"image too large: {w}x{h} (limit {MAX_IMAGE_PIXELS:,} pixels)")
    img.load()
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise VlmError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """RGB copy of any mode (palette, CMYK, 16-bit, alpha...).

    With `background`, transparent pixels are composited onto it (Idefics3's rule); without,
    alpha is simply dropped (PIL's `convert("RGB")`, Qwen2-VL's rule).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than let PIL clip everything to white.
        a = np.asarray(img, dtype=np.float64)
        peak = a.max() if a.size else 0.0
        scale = 255.0 / (65535.0 if peak > 255 else 255.0)
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), mode="L")
    if background is not None and (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
