"""A VLM's text decoder at its real shapes, random 4-bit weights: prefill, decode and the
memory-bandwidth limit, as `vlm bench` reports them.

    python scripts/bench_decoder_shapes.py [--model qwen2-vl-2b|smolvlm-256m|smolvlm-500m]
                                           [--threads 2] [--pp 512] [--tg 128] [--reps 3] [--json]
                                           [--parallel 1,2,4,8]

Weights are random nibbles with small fp16 scales (no float model is ever built), 4-bit
asymmetric group 32 like Q4_1, embeddings / tied head 8-bit; M-RoPE for Qwen2-VL. Also prints
the peak memory against the weights plus the KV cache actually used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {
    "qwen2-vl-2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-6,
                        rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                        mrope_section=[16, 24, 24], model_type="qwen2"),
    # SmolVLM's text decoders: SmolLM2-135M and SmolLM2-360M shapes, 49280 tokens with the image ones.
    "smolvlm-256m": dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True, model_type="llama"),
    "smolvlm-500m": dict(vocab_size=49280, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True, model_type="llama"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="qwen2-vl-2b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=lambda t: [int(v) for v in t.split(",")], default=[],
                    help="numbers of sequences decoded together (aggregate decode tok/s)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tempfile

    from tokenizers import Tokenizer as HFTokenizer

    from vlm import bench, kernels
    from vlm.models.llama import LlamaModel, TextConfig
    from vlm.runtime import Model
    from vlm.testing.random_decoder import random_decoder_tensors
    from vlm.testing.tiny_llm import make_tokenizer
    from vlm.tokenizer import Tokenizer

    kernels.set_threads(args.threads)
    decoder = LlamaModel(TextConfig(**SHAPES[args.model]), random_decoder_tensors(SHAPES[args.model]))
    with tempfile.TemporaryDirectory() as tmp:  # benchmarks feed token ids: any tokenizer will do
        make_tokenizer(Path(tmp))
        tokenizer = Tokenizer(HFTokenizer.from_file(str(Path(tmp) / "tokenizer.json")))
    model = Model(decoder, tokenizer, context=2048, info={"path": f"{args.model} decoder shapes, random q4"})
    weights = sum(lin.nbytes for layer in decoder.layers for lin in layer.linears()) + decoder.lm_head.nbytes
    result = bench.run(model, [args.pp], [args.tg], [0], [], args.reps, args.threads, args.parallel)
    c = decoder.config
    kv_used = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.cache.k.itemsize * max(
        args.pp, args.tg + 1)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(bench.to_markdown(result))
    tg = next(r for r in result["rows"] if r["test"].startswith("tg"))
    print(f"decode {tg['median']:.1f} tok/s = {100 * tg['median'] / result['decode_limit_tps']:.0f}% of the "
          f"bandwidth limit; weights {weights / 2**20:.0f} MiB + KV used {kv_used / 2**20:.0f} MiB, "
          f"process peak {result['peak_memory_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
