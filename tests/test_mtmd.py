"""Our image embeddings against llama.cpp's own image encoder (libmtmd) on the same image.

The tiny checkpoints are converted by llama.cpp's convert_hf_to_gguf.py (conftest's
`llama_cpp_pairs`, shared with tests/test_mmproj.py) into an f32 mmproj and an f32 text GGUF (mtmd
reads its image markers' tokens from a text model); vlm loads the HF folder. Equal embeddings prove the
preprocessing and the towers equal llama.cpp's, except where llama.cpp departs from transformers
(our reference) by design, which is measured here:

- Qwen2-VL / Qwen2.5-VL: when the 28-px-aligned size changes the aspect ratio, mtmd resizes
  keeping the aspect (Pillow-exact bicubic) and pads the rest black, centred; transformers
  stretches. An image that needs no resize or a uniform one is embedded identically.
  mtmd also asks for at least 8 merged tokens (transformers: min_pixels 3136, 4 tokens).
- Qwen2.5-VL: llama.cpp's converter does not store `window_size` and mtmd assumes 112 px, so the
  comparison uses the tiny model with 112-px windows.
- Idefics3 (SmolVLM): the same tiles in the same order, Pillow-exact Lanczos, odd sizes included.

The remaining difference, ~5e-4 of the largest value, is llama.cpp's arithmetic (the same with its
flash attention off; vlm f32 equals transformers within 1e-4); the bound is our f16 vision
path's (tests/test_idefics3.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.torch, pytest.mark.slow]

TOL = 2e-3  # our f16 vision weights vs transformers f32 (test_idefics3.test_vision_mixed_precision)
PATCH = 14  # Qwen2-VL's patch side in pixels


@pytest.fixture(scope="session")
def mtmd_pair(request, llama_cpp_pairs):
    """Factory: (vlm model of the HF folder, libmtmd encoder of llama.cpp's conversion of it) of
    one tiny family, both f32, built once each."""
    pytest.importorskip("llama_cpp.mtmd_cpp")
    from test_mmproj import pair_files

    import vlm
    from vlm.testing.llama_cpp_mtmd import Mtmd

    made: dict = {}

    def get(family: str):
        if family not in made:
            folder, converted = llama_cpp_pairs[family]  # Qwen2.5-VL: mtmd's fixed 112-px windows
            text, mmproj = pair_files(converted)
            encoder = Mtmd(mmproj, text)
            request.addfinalizer(encoder.close)
            made[family] = vlm.load(folder, quantize="f32", vision_quantize="f32"), encoder
        return made[family]

    return get


def _image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise (resampling differences show, unlike on flat colour)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    noise = np.random.default_rng(seed).integers(-40, 40, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _ours(model, rgb: np.ndarray) -> np.ndarray:
    return model.family.embed([model.family.preprocess(Image.fromarray(rgb))])


def _theirs(encoder, rgb: np.ndarray) -> np.ndarray:
    return np.concatenate(encoder.encode(rgb))  # Idefics3: one chunk per tile, in prompt order


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


# (width, height): no resize (multiples of 28), a uniform resize (250 -> 252), and for Idefics3
# odd sizes and aspect ratios (each resized to 192 px then cut into 64-px tiles).
SIZES = {"qwen2_vl": [(224, 224), (252, 168), (250, 250)],
         "qwen2_5_vl": [(224, 224), (250, 250)],
         "idefics3": [(224, 224), (333, 517), (100, 37), (640, 480)]}


@pytest.mark.parametrize("family", SIZES)
def test_embeddings_equal_llama_cpp(family, mtmd_pair):
    model, encoder = mtmd_pair(family)
    for i, (w, h) in enumerate(SIZES[family]):
        rgb = _image(w, h, seed=i)
        assert _rel(_ours(model, rgb), _theirs(encoder, rgb)) < TOL, (w, h)


def _letterbox(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """mtmd's Qwen-VL resize: aspect kept (sides rounded up), centred on black."""
    h, w = rgb.shape[:2]
    scale = min(width / w, height / h)
    new_w, new_h = min(math.ceil(w * scale), width), min(math.ceil(h * scale), height)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC),
                 ((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(canvas)


def test_qwen2_vl_differences_by_design(mtmd_pair):
    model, encoder = mtmd_pair("qwen2_vl")
    rgb = _image(333, 517)  # aligned to 336 x 504: wider than the image's aspect
    _, grid_h, grid_w = model.family.preprocess(Image.fromarray(rgb)).grid
    theirs = _theirs(encoder, rgb)
    assert _rel(_ours(model, rgb), theirs) > 0.1  # transformers stretches, mtmd pads
    assert _rel(_ours(model, _letterbox(rgb, grid_w * PATCH, grid_h * PATCH)), theirs) < TOL
    # A 100 x 37 image: transformers 4 merged tokens (56 x 56 px), mtmd at least 8.
    small = _image(100, 37)
    assert (_ours(model, small).shape[0], _theirs(encoder, small).shape[0]) == (4, 10)
