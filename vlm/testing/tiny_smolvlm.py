"""Make a tiny random SmolVLM (Idefics3) checkpoint directory for parity tests; no download.

    python scripts/make_tiny_smolvlm.py OUT_DIR [--seed 0]

Vision: SigLIP with 2 layers, width 32, 64-px tiles of 16-px patches (16 patches), pixel shuffle
by 2 -> 4 `<image>` tokens per tile; images are resized to a longest edge of 192 and cut into
at most 3 x 3 tiles + the global one. Text: Llama, 2 layers, width 64, 4 heads, 2 KV heads.
The tokenizer is SmolLM2's (from the GGUF in weights/) plus SmolVLM's added tokens at the ids
the real SmolVLM-256M-Instruct tokenizer gives them (`<image>` 49190, vocab 49280), and the real
chat template. Needs torch, transformers and gguf (transformers reads SmolLM2's tokenizer
from the GGUF with it); the result loads with Idefics3Processor /
Idefics3ForConditionalGeneration.from_pretrained (with --arch smolvlm: SmolVLM2's format, which
loads with SmolVLMForConditionalGeneration).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlm.testing import SMOLLM2_GGUF as GGUF
from vlm.testing.transformers_gguf import gguf_tokenizer

# SmolVLM-256M-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# SmolVLM's added tokens in id order, from 49152: the global tag, the 6 x 6 grid tags, the two
# image tokens, 88 reserved fillers, then <end_of_utterance> at 49279.
ADDED_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(88)]
    + ["<end_of_utterance>"]
)

TILE, LONGEST_EDGE, PATCH, SCALE = 64, 192, 16, 2


def make_tokenizer(gguf: Path = GGUF):
    """SmolLM2's tokenizer with SmolVLM's special tokens (vocab 49280, `<image>` = 49190)."""
    tok = gguf_tokenizer(gguf)
    if len(tok) != 49152:
        raise SystemExit(f"unexpected base vocabulary size {len(tok)} in {gguf}")
    tok.add_tokens(ADDED_TOKENS, special_tokens=True)
    tok.eos_token = "<end_of_utterance>"
    tok.pad_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_smolvlm(out_dir: str | Path, seed: int = 0, std: float = 0.08, arch: str = "idefics3") -> Path:
    """Write config, model.safetensors, tokenizer and processor files of a tiny random SmolVLM.

    arch "idefics3": SmolVLM's checkpoint format. "smolvlm": SmolVLM2's (transformers' SmolVLM
    classes, `model_type: smolvlm`); its processor files are written piece by piece, because
    SmolVLMProcessor cannot be built without its video processor, which needs torchvision.
    """
    import json

    import torch
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[arch]
    Config, Model, ImageProcessor = (getattr(transformers, prefix + n)
                                     for n in ("Config", "ForConditionalGeneration", "ImageProcessorPil"))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    image_seq_len = (TILE // PATCH) ** 2 // SCALE**2
    config = Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": TILE, "patch_size": PATCH},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 2048,
                     "pad_token_id": tok.pad_token_id, "bos_token_id": 1,
                     "eos_token_id": tok.convert_tokens_to_ids("<end_of_utterance>")},
        scale_factor=SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm scales near 1 keep the signal; everything else N(0, std) so logits are not flat.
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    model.save_pretrained(out)

    image_processor = ImageProcessor(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=1)
    if arch == "idefics3":
        processor = transformers.Idefics3Processor(image_processor, tok, image_seq_len=image_seq_len,
                                                   chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(out)
    else:
        image_processor.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (out / "processor_config.json").write_text(json.dumps(
            {"image_seq_len": image_seq_len, "processor_class": "SmolVLMProcessor"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=("idefics3", "smolvlm"), default="idefics3")
    args = ap.parse_args()
    out = make_tiny_smolvlm(args.out_dir, seed=args.seed, arch=args.arch)
    print(f"wrote {out}")
