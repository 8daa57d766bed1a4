"""The text decoder of the Llama / Qwen2 architectures (and the language half of every VLM family).

Qwen2 is Llama with q/k/v biases; Qwen2-VL adds M-RoPE (three position axes). One token step
reads top to bottom in `LlamaModel.forward`: embed -> N x (attention, MLP) -> norm -> head.
Tensor names are the Hugging Face checkpoint's: `model.layers.N.self_attn.q_proj.weight`...

Decoding one token runs the same steps fused in C (`LlamaModel.decode_step`, vlm/kernels/decode.c)
when the kernels hold every layer's weights: one call instead of ~15 per layer. `decode_batch`
decodes one token of each of several sequences in that one call, every weight read once for all.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from vlm import kernels
from vlm.errors import VlmError, shown
from vlm.models.layers import (
    ACTIVATIONS,
    ROPE_SCALINGS,
    Attention,
    Embedding,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    lookup,
    rope_attention_factor,
    rope_inv_freq,
)
from vlm.quant import Weight

SUPPORTED = ("llama", "qwen2", "mistral")
_UNBUILT = object()


@dataclass
class TextConfig:
    """Decoder hyper-parameters, named as in Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    mrope_section: list[int] | None = None  # Qwen2-VL: half-dim split over (t, h, w)
    model_type: str = "llama"

    @classmethod
    def from_dict(cls, d: Mapping) -> TextConfig:
        """The decoder's settings from a config.json-style dict; `validate` checks their values."""
        if not isinstance(d, Mapping):
            raise VlmError(f"the model config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model_type", "llama") not in SUPPORTED:
            raise VlmError(f"unsupported text architecture {shown(repr(d.get('model_type')))}; "
                           f"supported: {', '.join(SUPPORTED)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise VlmError(f"the model config lacks {missing[0]}")
        d.setdefault("num_key_value_heads", d["num_attention_heads"])
        if d.get("head_dim") is None:
            heads = d["num_attention_heads"]
            d["head_dim"] = d["hidden_size"] // heads if _positive_int(heads) and _positive_int(d["hidden_size"]) else 0
        if d.get("model_type") == "qwen2":
            d.setdefault("attention_bias", True)
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope is not None and not isinstance(rope, Mapping):
            raise VlmError(f"the model config's rope_scaling must be an object, got {shown(repr(rope))}")
        if rope:
            d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            if rope.get("mrope_section"):
                d["mrope_section"] = rope["mrope_section"]
            kind = rope.get("rope_type", rope.get("type", "default"))
            d["rope_scaling"] = rope if kind not in ("default", "mrope") else None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self, shapes: Mapping[str, tuple[int, ...]], context: int, kv_itemsize: int) -> None:
        """VlmError unless every hyperparameter is sane, agrees with the tensors' `shapes` (HF
        names) and a KV cache of `context` tokens fits in memory. Runs before anything is
        allocated: a 4-byte edit of a file must not make us reserve gigabytes."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not _positive_int(getattr(self, name)):
                raise VlmError(f"bad model config: {name} must be a whole number >= 1, got "
                               f"{shown(repr(getattr(self, name)))}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise VlmError(f"bad model config: {name} must be a finite number > 0, got {shown(repr(v))}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise VlmError(f"bad model config: {self.num_attention_heads} attention heads do not split into "
                           f"{self.num_key_value_heads} key/value heads")
        if self.head_dim % 2:
            raise VlmError(f"bad model config: head_dim {self.head_dim} is odd (rotary needs pairs)")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise VlmError(f"unsupported hidden_act {shown(repr(self.hidden_act))}; supported: "
                           f"{', '.join(ACTIVATIONS)}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if not isinstance(kind, str) or kind not in ROPE_SCALINGS:
                raise VlmError(f"unsupported rope scaling {shown(repr(kind))}; supported: {', '.join(ROPE_SCALINGS)}")
            missing = [k for k in ROPE_SCALINGS[kind] if not isinstance(self.rope_scaling.get(k), int | float)]
            if missing:
                raise VlmError(f"bad model config: {kind} rope scaling lacks a number for {missing[0]}")
        if self.mrope_section is not None and (not isinstance(self.mrope_section, list) or not all(
                _positive_int(n) for n in self.mrope_section) or sum(self.mrope_section) != self.head_dim // 2):
            raise VlmError(f"bad model config: mrope_section {shown(self.mrope_section)} does not split "
                           f"head_dim {self.head_dim} / 2")
        layers = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
        if self.num_hidden_layers > len(layers):
            raise VlmError(f"bad model config: {self.num_hidden_layers} layers, but the weights hold {len(layers)}")
        self._check_shapes(shapes)
        cache = 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * context * kv_itemsize
        available = available_memory()
        if available is not None and cache > available:
            raise VlmError(f"a KV cache of {context:,} tokens needs {cache / 2**30:.1f} GiB but only "
                           f"{available / 2**30:.1f} GiB of memory is available; use a smaller context (-c)")

    def _check_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        h, q, kv, ff = (self.hidden_size, self.num_attention_heads * self.head_dim,
                        self.num_key_value_heads * self.head_dim, self.intermediate_size)
        embed = shapes.get("model.embed_tokens.weight")
        if embed is None or len(embed) != 2 or embed[1] != h:
            raise VlmError(f"bad model: the token embedding has shape {embed}, expected (vocab, {h})")
        if self.vocab_size > embed[0]:
            raise VlmError(f"bad model config: vocab_size {self.vocab_size} exceeds the {embed[0]} embedding rows")
        expected = {"model.norm.weight": (h,)}
        if "lm_head.weight" in shapes:
            expected["lm_head.weight"] = (embed[0], h)
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            expected.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff)})
            for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                if p + f"self_attn.{proj}.bias" in shapes:
                    expected[p + f"self_attn.{proj}.bias"] = (rows,)
        for name, shape in expected.items():
            if name not in shapes:
                raise VlmError(f"checkpoint is missing tensor {name}")
            if tuple(shapes[name]) != shape:
                raise VlmError(f"bad model: tensor {name} has shape {tuple(shapes[name])}, but the config "
                               f"implies {shape}")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Rope scalings `rope_inv_freq` implements, with the settings each needs.
def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _exact_batches(n: int) -> list[tuple[int, int]]:
    """Row ranges of at most kernels.SOLO_TOKENS: the widest products whose rows are each
    computed as when alone (beyond that the kernels' float sums change order)."""
    width = max(kernels.SOLO_TOKENS, 1)
    return [(a, min(n, a + width)) for a in range(0, n, width)]


class DecoderLayer:
    def __init__(self, self_attn: Attention, mlp: GatedMLP, input_layernorm: RMSNorm,
                 post_attention_layernorm: RMSNorm):
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def linears(self) -> list[Linear]:
        """The layer's projections, in the order the fused decode plan takes them."""
        a, m = self.self_attn, self.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache, start: int) -> np.ndarray:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel:
    """Decoder-only transformer with a KV cache; `forward` runs one chunk of positions."""

    def __init__(self, config: TextConfig, tensors: Mapping[str, Weight]):
        self.config = c = config

        def w(name: str) -> Weight:
            return lookup(tensors, name)

        # The layers' 8-bit matrices (q8, and GGUF types transcoded to 8 bits) take int8
        # activations as 4-bit ones always do and as llama.cpp does: the int8 GEMM is ~3x the
        # float one. The head keeps float activations, so the logits' last product stays exact.
        def linear(name: str) -> Linear:
            return Linear(w(name + ".weight"), tensors.get(name + ".bias"), int8_activations=True)

        # Tied embeddings: the head is built first so the table is read from its packed copy, and
        # `embed` is let go before the layers are built (a loaded copy is then freed at once).
        embed = w("model.embed_tokens.weight")
        tied = c.tie_word_embeddings or "lm_head.weight" not in tensors
        self.lm_head = Linear(embed if tied else w("lm_head.weight"))
        self.embed_tokens = Embedding(embed, self.lm_head if tied else None)
        del embed
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            attn = Attention(linear(p + "self_attn.q_proj"), linear(p + "self_attn.k_proj"),
                             linear(p + "self_attn.v_proj"), linear(p + "self_attn.o_proj"),
                             c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            mlp = GatedMLP(linear(p + "mlp.gate_proj"), linear(p + "mlp.up_proj"), linear(p + "mlp.down_proj"),
                           c.hidden_act)
            self.layers.append(DecoderLayer(attn, mlp, RMSNorm(w(p + "input_layernorm.weight"), c.rms_norm_eps),
                                            RMSNorm(w(p + "post_attention_layernorm.weight"), c.rms_norm_eps)))
        self.norm = RMSNorm(w("model.norm.weight"), c.rms_norm_eps)
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_scale = rope_attention_factor(c.rope_scaling)
        # M-RoPE: which position axis (t, h, w) drives each rotary frequency.
        section = c.mrope_section or [c.head_dim // 2]
        self.rope_axis = np.repeat(np.arange(len(section)), section)
        self._plan = _UNBUILT  # the DecoderPlan, or None when the fused step cannot run

    def new_cache(self, max_len: int, dtype=np.float32) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_len, dtype)

    def rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin [n, head_dim] for positions [n] or, with M-RoPE, [3, n]."""
        if positions.ndim == 1:
            freqs = positions.astype(np.float64)[:, None] * self.inv_freq
        else:
            freqs = positions[self.rope_axis].T.astype(np.float64) * self.inv_freq
        emb = np.concatenate([freqs, freqs], axis=-1)
        scale = self.rope_scale  # YaRN's attention temperature; 1 (exact) otherwise
        return (np.cos(emb) * scale).astype(np.float32), (np.sin(emb) * scale).astype(np.float32)

    def forward(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        """Run embeddings x [n, hidden] at cache slots start..start+n; returns final-normed hidden [n, hidden]."""
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i), start)
        return self.norm(x)

    def decode_step(self, x: np.ndarray, positions: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        """`forward` for one token x [1, hidden], in one C call when a fused plan exists.

        The plan runs the kernels `forward` would, in the same order, so the result is
        bit-identical; cos/sin still come from `rope`, so M-RoPE and rope scaling carry over.
        """
        return self.decode_batch(x, [positions], [cache], [start])

    def decode_batch(self, x: np.ndarray, positions: Sequence[np.ndarray], caches: Sequence[KVCache],
                     starts: Sequence[int]) -> np.ndarray:
        """One token of each of B sequences: x [B, hidden], row r at positions[r] ([1], or [3, 1]
        with M-RoPE) in cache slot starts[r] of caches[r]; returns final-normed hidden [B, hidden].

        With a fused plan every matrix is read once for each SOLO_TOKENS rows (one C call);
        each row's attention reads only its own cache. Without one, each row runs `forward`
        alone. Either way each row gets the bits of its own `decode_step`.
        """
        plan = self.decode_plan()
        if plan is None:
            return np.concatenate([self.forward(x[r : r + 1], positions[r], caches[r], starts[r])
                                   for r in range(len(caches))])
        cos, sin = self.rope(np.concatenate(positions, axis=-1))
        return np.concatenate([plan.step(x[a:b], cos[a:b], sin[a:b], [c.k for c in caches[a:b]],
                                         [c.v for c in caches[a:b]], starts[a:b])
                               for a, b in _exact_batches(len(caches))])

    def head(self, h: np.ndarray) -> np.ndarray:
        """Logits [B, vocab] of final-normed hidden states h [B, hidden], each row the bits it
        gets alone (numpy's BLAS sums a matrix of rows in another order than one row)."""
        if self.lm_head.packed is None:
            return np.concatenate([self.lm_head(h[r : r + 1]) for r in range(h.shape[0])])
        return np.concatenate([self.lm_head(h[a:b]) for a, b in _exact_batches(h.shape[0])])

    def decode_plan(self):
        """The C-side plan of every layer (packed weights, norms, biases), shared by every
        cache: built once, or None when the fused step cannot run (no kernels, a weight the
        kernels do not hold, an activation other than SiLU)."""
        if self._plan is _UNBUILT:
            self._plan = self._build_plan()
        return self._plan

    def _build_plan(self):
        c = self.config
        fusable = (kernels.AVAILABLE and c.hidden_act in ("silu", "swish") and c.head_dim <= kernels.MAX_HEAD_DIM
                   and all(lin.packed is not None for layer in self.layers for lin in layer.linears()))
        if not fusable:
            return None
        layers = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   tuple(lin.packed for lin in layer.linears()), tuple(lin.bias for lin in layer.linears()))
                  for layer in self.layers]
        return kernels.DecoderPlan(layers, self.norm.weight, c.rms_norm_eps, c.num_attention_heads)
