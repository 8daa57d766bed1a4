"""A decoder's tensors at real shapes with random 4-bit weights, made on lookup (no float model
is ever built): for memory and speed measurements at the shapes of models we cannot download.

Random nibbles with small fp16 scales, 4-bit asymmetric group 32 like Q4_1; embeddings 8-bit.
"""

from __future__ import annotations

import functools

import numpy as np

from vlm.formats.lazy import LazyTensors
from vlm.quant import QuantizedWeight


def random_q4(seed: int, rows: int, cols: int):
    rng = np.random.default_rng(seed)
    groups = cols // 32
    return QuantizedWeight(4, 32, False, rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                           np.full((rows, groups), 0.004, np.float16), np.full((rows, groups), -0.03, np.float16))


def random_q8(seed: int, rows: int, cols: int):
    rng = np.random.default_rng(seed)
    return QuantizedWeight(8, 32, True, rng.integers(-127, 128, (rows, cols), dtype=np.int8),
                           np.full((rows, cols // 32), 0.0005, np.float16))


def random_decoder_tensors(c: dict, seed: int = 0):
    """The decoder's tensors, each made when looked up (so the model holds only its packed copy)."""
    h, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    t = {"model.embed_tokens.weight": functools.partial(random_q8, seed, v, d),
         "model.norm.weight": functools.partial(np.ones, d, np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for j, (name, rows, cols) in enumerate((("self_attn.q_proj", h, d), ("self_attn.k_proj", kv, d),
                                                ("self_attn.v_proj", kv, d), ("self_attn.o_proj", d, h),
                                                ("mlp.gate_proj", f, d), ("mlp.up_proj", f, d),
                                                ("mlp.down_proj", d, f))):
            t[p + name + ".weight"] = functools.partial(random_q4, (seed, i, j), rows, cols)
        for name, rows in (("q", h), ("k", kv), ("v", kv)) if c.get("attention_bias") else ():
            t[p + f"self_attn.{name}_proj.bias"] = functools.partial(np.zeros, rows, np.float32)
        t[p + "input_layernorm.weight"] = functools.partial(np.ones, d, np.float32)
        t[p + "post_attention_layernorm.weight"] = functools.partial(np.ones, d, np.float32)
    return LazyTensors(t)
