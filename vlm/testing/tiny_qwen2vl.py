"""Build a tiny random Qwen2-VL checkpoint (transformers layout) for tests.

The architecture is Qwen2-VL's at toy sizes (vision depth 3 / width 64 / 4 heads; text 2 layers,
width 64, 4 heads, 2 KV heads, head_dim 16, mrope_section [2, 3, 3]) with weights ~N(0, 0.08) so
logits are far from flat. The tokenizer is SmolLM2's byte-level BPE (read from its GGUF) plus
Qwen2-VL's special tokens, with Qwen2-VL-2B-Instruct's chat template. Needs torch, transformers
and gguf (transformers reads SmolLM2's tokenizer from the GGUF with it).

    python scripts/make_tiny_qwen2vl.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from vlm.testing import SMOLLM2_GGUF as GGUF
from vlm.testing.transformers_gguf import gguf_tokenizer

# Qwen2-VL-2B-Instruct's chat template (tokenizer_config.json / chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]

# Qwen2-VL-2B-Instruct's preprocessor_config.json.
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def make_tokenizer(out_dir: str | os.PathLike, gguf_path: str | os.PathLike = GGUF):
    """SmolLM2's tokenizer + Qwen2-VL's special tokens, saved in the hub layout; returns it."""
    tok = gguf_tokenizer(gguf_path)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": missing})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    # Hub layout: the template lives in tokenizer_config.json (and chat_template.json), Qwen2 adds no BOS.
    out = Path(out_dir)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, add_bos_token=False, bos_token=None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return tok


# Depth 3, not 2: llama.cpp's converter maps `merger.mlp.{i}` by block index, so the tiny tower
# needs a block 2 for its mmproj to convert (tests/test_mmproj.py).
TINY_VISION = {"depth": 3, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 64}


def make_tiny_qwen2vl(out_dir: str | os.PathLike, seed: int = 0, std: float = 0.08) -> Path:
    """Write config.json, model.safetensors, preprocessor_config.json and the tokenizer to out_dir."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return save_tiny(out_dir, Qwen2VLConfig, Qwen2VLForConditionalGeneration, TINY_VISION, PREPROCESSOR_CONFIG,
                     seed, std)


def save_tiny(out_dir: str | os.PathLike, config_class, model_class, vision_config: dict, preprocessor_config: dict,
              seed: int = 0, std: float = 0.08, gguf_path: str | os.PathLike = GGUF) -> Path:
    """A Qwen VL family's checkpoint at toy sizes: the tiny text config below, `vision_config`,
    random weights (see `randomize`), the tokenizer and `preprocessor_config`."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, gguf_path)
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS), strict=True))
    vocab = (len(tok) + 63) // 64 * 64
    config = config_class(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=tok.pad_token_id,
        ),
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize(model, std)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2))
    return out


def randomize(model, std: float = 0.08) -> None:
    """Weights ~N(0, std), so logits are far from flat; norm scales near 1, not exactly (catches a dropped one)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_qwen2vl(args.out_dir, args.seed))
