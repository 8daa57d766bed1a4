"""Layers every family shares, written once: linear, norms, activations, rotary, attention, MLPs.

All activations are float32 numpy arrays laid out [tokens, features]. Weights may be float32
arrays, 16-bit `HalfWeight`s or `QuantizedWeight`s; `Linear` hides which.

The hot operations (matmuls of packed weights, RMSNorm, SwiGLU, rotary, attention) run in the
C kernels of `vlm.kernels` when they are loaded; the numpy functions named `*_numpy` below are
the reference they are tested against and the path without them.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vlm import kernels
from vlm.errors import VlmError, shown
from vlm.memory import mapping_of, release_pages
from vlm.quant import Weight, stored_arrays

# Rows of a stored matrix widened to float32 at once on the numpy path: bounds the scratch memory.
_WIDEN_ROWS = 4096


def lookup(tensors: Mapping[str, Weight], name: str) -> Weight:
    """tensors[name], or a VlmError naming the tensor the checkpoint lacks."""
    try:
        return tensors[name]
    except KeyError:
        raise VlmError(f"checkpoint is missing tensor {name}") from None


def expect_shape(name: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    """VlmError unless a tensor has the shape the model's widths give it: a damaged checkpoint
    then fails as it loads, not inside a product on its first input."""
    if tuple(shape) != tuple(want):
        raise VlmError(f"bad model: {name} has shape {tuple(shape)}, expected {tuple(want)}")


class Linear:
    """y = x @ W.T + b, with W in any stored form; the C kernel is used when it supports W.

    Once the kernel has repacked W, the original is let go (`weight` is None), so the weights
    are held in memory once, in the kernel's layout.
    """

    def __init__(self, weight: Weight, bias: np.ndarray | None = None, int8_activations: bool = False):
        self.bias = None if bias is None else np.asarray(bias, dtype=np.float32)
        # The kernel's repacked layout, or None; see kernels.prepare for int8_activations. The
        # repacked copy replaces the file's pages: they are dropped as they are repacked.
        arrays = stored_arrays(weight)
        file_mapped = all(mapping_of(a) is not None for a in arrays)
        self.packed = kernels.prepare(weight, int8_activations, drop_source_pages=file_mapped)
        self.weight = weight if self.packed is None else None
        if self.packed is not None:
            release_pages(*arrays)
        self.shape = tuple(weight.shape)
        self.kind = getattr(weight, "kind", "f32")
        self.nbytes = int(weight.nbytes)  # of the stored form: what a decode step reads
        if self.bias is not None:
            expect_shape("a bias", self.bias.shape, self.shape[:1])

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.packed is not None:
            y = kernels.linear(x, self.packed)
        elif isinstance(self.weight, np.ndarray):
            y = x @ self.weight.T
        else:
            rows = self.weight.shape[0]
            y = np.empty((x.shape[0], rows), dtype=np.float32)
            for r in range(0, rows, _WIDEN_ROWS):
                y[:, r : r + _WIDEN_ROWS] = x @ self.weight.dequantize(slice(r, r + _WIDEN_ROWS)).T
        if self.bias is not None:
            y += self.bias
        return y


def project(x: np.ndarray, linears: Sequence[Linear]) -> list[np.ndarray]:
    """[linear(x) for linear in linears], in one kernel call when the kernels hold them all
    (x prepared once: the same values, bit for bit)."""
    if len(linears) > 1 and all(linear.packed is not None for linear in linears):
        ys = kernels.linears(x, [linear.packed for linear in linears])
        for y, linear in zip(ys, linears, strict=True):
            if linear.bias is not None:
                y += linear.bias
        return list(ys)
    return [linear(x) for linear in linears]


class Embedding:
    """Token embedding table; rows are widened to float32 only for the ids looked up.

    With `head`, the output projection tied to this table, rows are read from the head's
    repacked copy when it has one and the original is let go: the table is held once.
    """

    def __init__(self, weight: Weight, head: Linear | None = None):
        self.packed = None if head is None else head.packed
        self.weight = weight if self.packed is None else None
        self.kind = getattr(weight, "kind", "f32")
        self.nbytes = int(weight.nbytes)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.packed is not None:
            return kernels.unpack_rows(self.packed, ids)
        if isinstance(self.weight, np.ndarray):
            return np.asarray(self.weight[ids], dtype=np.float32)
        return self.weight.dequantize(ids)


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(var + eps)) * weight


class RMSNorm:
    def __init__(self, weight: np.ndarray, eps: float):
        self.weight = np.asarray(weight, dtype=np.float32)
        self.eps = eps

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if kernels.AVAILABLE:
            return kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm_numpy(x, self.weight, self.eps)


class LayerNorm:
    def __init__(self, weight: np.ndarray, bias: np.ndarray, eps: float):
        self.weight = np.asarray(weight, dtype=np.float32)
        self.bias = np.asarray(bias, dtype=np.float32)
        self.eps = eps
        expect_shape("a norm's bias", self.bias.shape, self.weight.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        xc = x - mean
        var = np.mean(xc * xc, axis=-1, keepdims=True)
        return xc * (1.0 / np.sqrt(var + self.eps)) * self.weight + self.bias


# --- activations -------------------------------------------------------------------------


def erf(x: np.ndarray) -> np.ndarray:
    """Error function to ~1e-7 absolute (Abramowitz & Stegun 7.1.26): numpy has none built in."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (s * (1.0 - poly * np.exp(-a * a))).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-1.702 * x))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
}


def activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):  # a config's value: one clear line
        raise VlmError(f"unsupported activation {shown(repr(name))}; supported: {', '.join(ACTIVATIONS)}") from None


class GatedMLP:
    """SwiGLU-style feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear, act: str = "silu"):
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act = activation(act)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate, up = project(x, [self.gate_proj, self.up_proj])
        if self.act is silu and kernels.AVAILABLE:
            return self.down_proj(kernels.swiglu(gate, up))
        return self.down_proj(self.act(gate) * up)


class MLP:
    """Plain two-layer feed-forward: fc2(act(fc1(x)))."""

    def __init__(self, fc1: Linear, fc2: Linear, act: str):
        self.fc1, self.fc2 = fc1, fc2
        self.act = activation(act)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fc2(self.act(self.fc1(x)))


# --- rotary embedding --------------------------------------------------------------------


# Rope scalings we compute, with the numbers each needs (checked when a config is read).
ROPE_SCALINGS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def rope_type(scaling: dict | None) -> str:
    """The kind of a rope scaling dict (either key transformers has used), "default" for none."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies of a rotary embedding over `dim` features (float64 for accuracy)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    kind = rope_type(scaling)
    if kind == "llama3":
        # Llama 3.x: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "yarn":
        # YaRN (as transformers computes it): frequencies that turn fewer than beta_slow times
        # over the original context are slowed by `factor`, those turning more than beta_fast
        # times are kept, a linear ramp over the feature index between.
        factor, old_ctx = scaling["factor"], scaling["original_max_position_embeddings"]

        def feature(rotations: float) -> float:
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = feature(scaling.get("beta_fast") or 32), feature(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        ramp = np.clip((np.arange(dim // 2) - lo) / (hi - lo if hi != lo else 0.001), 0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
    elif kind != "default":
        raise VlmError(f"unsupported rope scaling {kind!r}; supported: {', '.join(ROPE_SCALINGS)}")
    return inv


def rope_attention_factor(scaling: dict | None) -> float:
    """The scale on cos/sin: YaRN's attention temperature, 1 for every other rope."""
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate halves: x [heads, n, d] with cos/sin [n, d] (HF `rotate_half` convention).

    The result keeps x's memory order (a transposed view stays one), so attention reads it in place.
    """
    if kernels.AVAILABLE and x.ndim == 3 and cos.ndim == 2:
        return kernels.rotary(x, cos, sin)
    return apply_rotary_numpy(x, cos, sin)


def apply_rotary_numpy(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --- attention ---------------------------------------------------------------------------


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal_offset: int | None) -> np.ndarray:
    """Scaled dot-product attention with grouped KV heads.

    q [h, n, d], k/v [h_kv, t, d] -> [h, n, d]. With `causal_offset` o, query i sits at
    position o + i of the keys and sees keys 0..o+i; with None every query sees every key.
    Any strides: views of the KV cache are read in place. The C kernel's memory stays flat
    however long the sequence (numpy's holds the [n, t] scores of each head group).
    """
    if kernels.AVAILABLE and q.shape[-1] <= kernels.MAX_HEAD_DIM:
        return kernels.attention(q, k, v, causal_offset)
    return attend_numpy(q, k, v, causal_offset)


def attend_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal_offset: int | None) -> np.ndarray:
    h, n, d = q.shape
    h_kv, t, _ = k.shape
    g = h // h_kv
    # Scale q (n*d values) rather than the scores (n*t), and normalise after p @ v (n*d again).
    qg = (q * np.float32(1.0 / math.sqrt(d))).reshape(h_kv, g * n, d)
    scores = qg @ k.transpose(0, 2, 1)  # [h_kv, g*n, t]
    if causal_offset is not None and t > causal_offset + 1:  # some key lies past query 0's position
        s4 = scores.reshape(h_kv, g, n, t)
        s4[..., np.arange(t)[None, :] > (causal_offset + np.arange(n))[:, None]] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = scores @ v  # [h_kv, g*n, d]
    out /= scores.sum(axis=-1, keepdims=True)
    return out.reshape(h, n, d)


def store(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, into a float16 KV cache through the kernels' F16C rounding (the same
    values as numpy's cast, which is scalar and took ~8% of a prefill)."""
    if kernels.AVAILABLE and dst.dtype == np.float16:
        kernels.store_half(dst, src)
    else:
        dst[...] = src


class Attention:
    """Multi-head attention with grouped KV heads, rotary positions and an optional KV cache.

    Used by the causal decoders (with a cache) and by the vision towers (bidirectional,
    one call per image so each image attends only to itself).
    """

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: int,
                 n_kv_heads: int, head_dim: int):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def qkv(self, x: np.ndarray, cos: np.ndarray | None, sin: np.ndarray | None):
        """Projected (and rotated) q [h, n, d], k and v [h_kv, n, d]."""
        n = x.shape[0]
        q, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.reshape(n, self.n_heads, self.head_dim).transpose(1, 0, 2)
        k = k.reshape(n, self.n_kv_heads, self.head_dim).transpose(1, 0, 2)
        v = v.reshape(n, self.n_kv_heads, self.head_dim).transpose(1, 0, 2)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def output(self, o: np.ndarray) -> np.ndarray:
        h, n, d = o.shape
        return self.o_proj(np.ascontiguousarray(o.transpose(1, 0, 2)).reshape(n, h * d))

    def __call__(self, x: np.ndarray, cos: np.ndarray | None, sin: np.ndarray | None,
                 cache: LayerKV | None = None, start: int = 0) -> np.ndarray:
        q, k, v = self.qkv(x, cos, sin)
        if cache is None:
            return self.output(attend(q, k, v, causal_offset=None))
        end = start + x.shape[0]
        store(cache.k[:, start:end], k)
        store(cache.v[:, start:end], v)
        return self.output(attend(q, cache.k[:, :end], cache.v[:, :end], causal_offset=start))


class LayerKV:
    """One layer's view of the KV cache: k and v [n_kv_heads, max_len, head_dim]."""

    def __init__(self, k: np.ndarray, v: np.ndarray):
        self.k, self.v = k, v


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros whose memory is committed page by page as it is written.

    An anonymous mmap, not np.zeros: numpy asks for transparent huge pages on large arrays,
    which would commit 2 MiB for every head's first token and make the cache resident at once.
    """
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class KVCache:
    """Preallocated keys and values for every layer: k and v [n_layers, n_kv_heads, max_len, head_dim].

    Float32, or float16 (half the memory and the bytes decode reads at depth; llama.cpp's
    default too): k and v are rounded to float16 as they are stored and widened as they are read.
    What each position holds is the owning `vlm.session.Session`'s business.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32):
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k, self.v = _lazy_zeros(shape, dtype), _lazy_zeros(shape, dtype)
        self.max_len = max_len

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i])

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
