"""Build a tiny random Qwen2.5-VL checkpoint (transformers layout) for tests.

Qwen2.5-VL at toy sizes: vision depth 3 / width 64 / 4 heads / gated MLP 96 wide, windows of
56 px (2 x 2 merged tokens, so most images split unevenly), block 1 with full attention; text
as the tiny Qwen2-VL (2 layers, width 64, mrope_section [2, 3, 3]). Weights ~N(0, 0.08), norm
scales near 1. Tokenizer and chat template as vlm/testing/tiny_qwen2vl.py makes them (SmolLM2's
byte-level BPE read from its GGUF, so this needs `gguf` besides torch and transformers);
Qwen2.5-VL's template and preprocessor config are Qwen2-VL's.

    python scripts/make_tiny_qwen2_5_vl.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlm.testing.tiny_qwen2vl import GGUF, save_tiny
from vlm.testing.tiny_qwen2vl import PREPROCESSOR_CONFIG as QWEN2VL_PREPROCESSOR_CONFIG

# Qwen2.5-VL-3B-Instruct's preprocessor_config.json: Qwen2-VL's image processor and settings.
PREPROCESSOR_CONFIG = {**QWEN2VL_PREPROCESSOR_CONFIG, "processor_class": "Qwen2_5_VLProcessor"}

TINY_VISION = {"depth": 3, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "out_hidden_size": 64,
               "window_size": 56, "fullatt_block_indexes": [1]}


def make_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0, std: float = 0.08,
                         gguf_path: str | os.PathLike = GGUF) -> Path:
    """Write config.json, model.safetensors, preprocessor_config.json and the tokenizer to out_dir."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return save_tiny(out_dir, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TINY_VISION,
                     PREPROCESSOR_CONFIG, seed, std, gguf_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_qwen2_5_vl(args.out_dir, args.seed))
