"""Make a tiny GGUF (llama.cpp's format) from a tiny HF Llama checkpoint (vlm/testing/tiny_llm.py).

    python scripts/make_tiny_gguf.py HF_DIR OUT.gguf

Laid out as llama.cpp's converter does: GGUF tensor names, Llama q/k rows permuted, matrices
in Q4_1 and the embedding in Q8_0 (as in SmolLM2's Q4_1 file), the BPE vocabulary and merges.
Needs numpy and the `gguf` package (llama.cpp's gguf-py), which writes the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(name: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    _, _, i, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{_TO_GGUF[module]}.{kind}"


def make_tiny_gguf(hf_dir: str | Path, out: str | Path) -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama", "only the llama tiny model is laid out here"
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_uint32("llama.block_count", config["num_hidden_layers"])
    w.add_uint32("llama.context_length", config["max_position_embeddings"])
    w.add_uint32("llama.embedding_length", config["hidden_size"])
    w.add_uint32("llama.feed_forward_length", config["intermediate_size"])
    w.add_uint32("llama.attention.head_count", heads)
    w.add_uint32("llama.attention.head_count_kv", kv_heads)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    w.add_float32("llama.rope.freq_base", config["rope_theta"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3 if t in specials else 1 for t in tokens])
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab[tok_cfg["eos_token"]])
    w.add_string("tokenizer.chat_template", tok_cfg["chat_template"])
    Q = gguf.GGMLQuantizationType
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if ".q_proj." in name or ".k_proj." in name:  # llama.cpp's adjacent-pair rotary layout
            n = heads if ".q_proj." in name else kv_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if t.ndim == 2:
            qtype = Q.Q8_0 if name == "model.embed_tokens.weight" else Q.Q4_1
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(t), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    args = ap.parse_args()
    print(make_tiny_gguf(args.hf_dir, args.out))
