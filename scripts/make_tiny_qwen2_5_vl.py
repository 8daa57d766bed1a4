"""Build a tiny random Qwen2.5-VL checkpoint (transformers layout) for tests.

Qwen2.5-VL at toy sizes: vision depth 3 / width 64 / 4 heads / gated MLP 96 wide, windows of
56 px (2 x 2 merged tokens, so most images split unevenly), block 1 with full attention; text
as the tiny Qwen2-VL (2 layers, width 64, mrope_section [2, 3, 3]). Weights ~N(0, 0.08), norm
scales near 1. Tokenizer and chat template as scripts/make_tiny_qwen2vl.py makes them (SmolLM2's
byte-level BPE read from its GGUF, so this needs `gguf` besides torch and transformers);
Qwen2.5-VL's template and preprocessor config are Qwen2-VL's.

    python scripts/make_tiny_qwen2_5_vl.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from make_tiny_qwen2vl import GGUF, SPECIAL_TOKENS, make_tokenizer
from make_tiny_qwen2vl import PREPROCESSOR_CONFIG as QWEN2VL_PREPROCESSOR_CONFIG

# Qwen2.5-VL-3B-Instruct's preprocessor_config.json: Qwen2-VL's image processor and settings.
PREPROCESSOR_CONFIG = {**QWEN2VL_PREPROCESSOR_CONFIG, "processor_class": "Qwen2_5_VLProcessor"}

TINY_VISION = {"depth": 3, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "out_hidden_size": 64,
               "window_size": 56, "fullatt_block_indexes": [1]}


def make_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0, std: float = 0.08,
                         gguf_path: str | os.PathLike = GGUF) -> Path:
    """Write config.json, model.safetensors, preprocessor_config.json and the tokenizer to out_dir."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, gguf_path)
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS), strict=True))
    vocab = (len(tok) + 63) // 64 * 64
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
        ),
        vision_config=TINY_VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):  # norm scales: near 1, not exactly (catches a dropped one)
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_qwen2_5_vl(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
