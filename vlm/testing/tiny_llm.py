"""Make a tiny random Llama or Qwen2 checkpoint (HF directory) for parity tests; no download.

    python scripts/make_tiny_llm.py OUT_DIR [--arch llama|qwen2|mistral|llama3|yarn] [--seed 0]

The tokenizer is a byte-level BPE trained here on a fixed corpus, with ChatML special tokens
and a ChatML chat template; weights are N(0, 0.08) so the logits are far from flat. Only
numpy, safetensors and tokenizers are needed, so tests can build it without torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Why is the sky blue? Because air scatters short wavelengths of sunlight more than long ones.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14 2026. Code: def f(x): return x * 2",
    "Café, naïve, résumé, Straße, Привет мир, 日本語のテキスト, 👍 emoji.",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's split rule (its tokenizer.json carries it; transformers re-imposes it for model_type qwen2).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Llama's weights under another config: the `mistral` model type, and the rope scalings. The
# original context is short (64) so the scaled and the ramped frequencies all occur at head_dim 16.
LLAMA_VARIANTS = {
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
}
ARCHS = ["llama", "qwen2", *LLAMA_VARIANTS]


def make_tokenizer(out: Path, vocab_size: int = 384, arch: str = "llama") -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": CHATML,
        "model_max_length": 512}, indent=1))
    return tok.get_vocab_size()


def make_tiny_llm(out_dir: str | Path, arch: str = "llama", seed: int = 0, std: float = 0.08) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of a tiny random model."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out, arch=arch)
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    config = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
              "hidden_act": "silu", "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}
    if arch == "llama" or arch in LLAMA_VARIANTS:
        config.update(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False)
        config.update(LLAMA_VARIANTS.get(arch, {}))
    elif arch == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6,
                      rope_theta=1e6, tie_word_embeddings=True)
    else:
        raise SystemExit(f"unknown arch {arch}")
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(vocab, hidden),
         "model.norm.weight": (1.0 + normal(hidden)).astype(np.float32)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = normal(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            t[p + f"self_attn.{name}_proj.weight"] = normal(rows, hidden)
            if arch == "qwen2":
                t[p + f"self_attn.{name}_proj.bias"] = normal(rows)
        t[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        t[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        t[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        t[p + "input_layernorm.weight"] = (1.0 + normal(hidden)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1.0 + normal(hidden)).astype(np.float32)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_llm(args.out_dir, args.arch, args.seed))
