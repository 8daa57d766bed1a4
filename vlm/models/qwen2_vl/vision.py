"""The Qwen2-VL vision tower in numpy: patch embedding, 2D-rotary ViT blocks, PatchMerger.

Several images are encoded in one pass: their patches are concatenated, so every Linear and
MLP runs once on the whole batch, while attention is block-diagonal (each image attends only
to itself) and cut into query chunks so the score matrix never exceeds `max_score_bytes`,
whatever the image size. Tensor names are the checkpoint's, without the `visual.` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlm.errors import VlmError
from vlm.models.layers import (
    MLP,
    GatedMLP,
    LayerNorm,
    Linear,
    RMSNorm,
    apply_rotary,
    attend,
    expect_shape,
    gelu,
    lookup,
    rope_inv_freq,
)
from vlm.models.settings import number, section, text, whole
from vlm.quant import HalfWeight, Weight

LAYER_NORM_EPS = 1e-6  # fixed in the reference, not in the config
# Attention scores of one head and query chunk held at once. Per-head chunks of a few MB keep the
# softmax passes in cache; 16 MB costs ~3% more CPU than 4 MB but makes 4x fewer BLAS calls, which
# matters when other processes compete for the cores (each multithreaded call waits for its slowest thread).
DEFAULT_MAX_SCORE_BYTES = 16 << 20
MLP_ROWS = 1024  # tokens per MLP call: bounds the [rows, 4 * width] activations


@dataclass
class VisionConfig:
    """Vision tower hyper-parameters, named as in the checkpoint's `vision_config`."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 1536  # merger output = the text decoder's width
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: Mapping) -> VisionConfig:
        """Accept the hub layout (`in_chans`) and the transformers 5 one (`in_channels`, `rope_parameters`)."""
        c = cls()
        return cls(
            depth=whole(d, "depth", c.depth),
            embed_dim=whole(d, "embed_dim", c.embed_dim),
            num_heads=whole(d, "num_heads", whole(d, "num_attention_heads", c.num_heads)),
            mlp_ratio=number(d, "mlp_ratio", c.mlp_ratio),
            hidden_size=whole(d, "hidden_size", c.hidden_size),
            hidden_act=text(d, "hidden_act", c.hidden_act),
            in_channels=whole(d, "in_channels", whole(d, "in_chans", c.in_channels)),
            patch_size=whole(d, "patch_size", whole(d, "spatial_patch_size", c.patch_size)),
            temporal_patch_size=whole(d, "temporal_patch_size", c.temporal_patch_size),
            spatial_merge_size=whole(d, "spatial_merge_size", c.spatial_merge_size),
            rope_theta=number(section(d, "rope_parameters"), "rope_theta", number(d, "rope_theta", c.rope_theta)),
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: C x T x P x P (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


Norm = LayerNorm | RMSNorm  # Qwen2-VL's tower uses LayerNorm, Qwen2.5-VL's RMSNorm


class VisionBlock:
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, norm1: Norm, qkv: Linear, proj: Linear, norm2: Norm, mlp: MLP | GatedMLP, num_heads: int):
        self.norm1, self.qkv, self.proj, self.norm2, self.mlp = norm1, qkv, proj, norm2, mlp
        self.num_heads = num_heads

    def attention(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, bounds: Sequence[tuple[int, int]],
                  max_score_bytes: int) -> np.ndarray:
        """Bidirectional attention inside each [start, end) span of `bounds`, in bounded query chunks."""
        n, width = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, 3, h, width // h)
        q = apply_rotary(qkv[:, 0].transpose(1, 0, 2), cos, sin)  # [h, n, d]
        k = apply_rotary(qkv[:, 1].transpose(1, 0, 2), cos, sin)
        v = qkv[:, 2].transpose(1, 0, 2)
        out = np.empty((n, h, width // h), dtype=np.float32)
        for a, b in bounds:
            # One head at a time: all heads' scores at once was 2-4x slower at 6k patches (out of cache).
            rows = max(1, max_score_bytes // (4 * (b - a)))
            for i in range(h):
                for s in range(a, b, rows):
                    e = min(s + rows, b)
                    out[s:e, i] = attend(q[i:i + 1, s:e], k[i:i + 1, a:b], v[i:i + 1, a:b], causal_offset=None)[0]
        return self.proj(out.reshape(n, width))

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, bounds: Sequence[tuple[int, int]],
                 max_score_bytes: int) -> np.ndarray:
        x = x + self.attention(self.norm1(x), cos, sin, bounds, max_score_bytes)
        for r in range(0, x.shape[0], MLP_ROWS):
            rows = slice(r, r + MLP_ROWS)
            x[rows] += self.mlp(self.norm2(x[rows]))
        return x


class PatchMerger:
    """A norm, then each merge x merge group of patches (contiguous rows) as one vector, then an MLP."""

    def __init__(self, ln_q: Norm, fc1: Linear, fc2: Linear, group: int):
        self.ln_q, self.fc1, self.fc2, self.group = ln_q, fc1, fc2, group

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.ln_q(x).reshape(-1, self.group * x.shape[-1])
        return self.fc2(gelu(self.fc1(x)))


class Qwen2VisionTransformer:
    """Qwen2-VL's ViT: pixel patches of one or more images -> merged tokens in the text width."""

    def __init__(self, config: VisionConfig, tensors: Mapping[str, Weight],
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES):
        self.config = c = config
        self.max_score_bytes = max_score_bytes
        # The Conv3d's stride equals its kernel, so it is one matmul over flattened patches.
        self.patch_embed = Linear(_as_matrix(lookup(tensors, "patch_embed.proj.weight"), c.embed_dim, c.patch_dim))
        self.blocks = [
            VisionBlock(self.norm(tensors, p + "norm1"), vision_linear(tensors, p + "attn.qkv"),
                        vision_linear(tensors, p + "attn.proj"), self.norm(tensors, p + "norm2"),
                        self.mlp(tensors, p + "mlp."), c.num_heads)
            for p in (f"blocks.{i}." for i in range(c.depth))
        ]
        self.merger = PatchMerger(self.norm(tensors, "merger.ln_q"), vision_linear(tensors, "merger.mlp.0"),
                                  vision_linear(tensors, "merger.mlp.2"), c.spatial_merge_size ** 2)
        self.check_widths()
        # 2D rotary: a quarter of head_dim rotates with the row index, a quarter with the column.
        self.inv_freq = rope_inv_freq(c.head_dim // 2, c.rope_theta)

    def check_widths(self) -> None:
        """VlmError unless every matrix and norm takes the width the step before it gives."""
        e = self.config.embed_dim
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}."
            expect_shape(p + "attn.qkv.weight", b.qkv.shape, (3 * e, e))
            expect_shape(p + "attn.proj.weight", b.proj.shape, (e, e))
            names = ("fc1", "fc2") if isinstance(b.mlp, MLP) else ("up_proj", "down_proj")
            up, down = (getattr(b.mlp, n) for n in names)
            expect_shape(f"{p}mlp.{names[0]}.weight", up.shape, (up.out_features, e))
            expect_shape(f"{p}mlp.{names[1]}.weight", down.shape, (e, up.out_features))
            if isinstance(b.mlp, GatedMLP):
                expect_shape(p + "mlp.gate_proj.weight", b.mlp.gate_proj.shape, up.shape)
            for norm in ("norm1", "norm2"):
                expect_shape(f"{p}{norm}.weight", getattr(b, norm).weight.shape, (e,))
        m = self.merger
        expect_shape("merger.ln_q.weight", m.ln_q.weight.shape, (e,))
        expect_shape("merger.mlp.0.weight", m.fc1.shape, (m.fc1.out_features, m.group * e))
        expect_shape("merger.mlp.2.weight", m.fc2.shape, (m.fc2.out_features, m.fc1.out_features))

    # The two parts a derived tower (Qwen2.5-VL) builds differently.
    def norm(self, tensors: Mapping[str, Weight], name: str) -> Norm:
        """The norm stored under `name` (blocks' norm1/norm2, the merger's ln_q)."""
        return LayerNorm(lookup(tensors, name + ".weight"), lookup(tensors, name + ".bias"), LAYER_NORM_EPS)

    def mlp(self, tensors: Mapping[str, Weight], prefix: str) -> MLP | GatedMLP:
        """A block's feed-forward, its layers stored under `prefix`."""
        return MLP(vision_linear(tensors, prefix + "fc1"), vision_linear(tensors, prefix + "fc2"),
                   self.config.hidden_act)

    def rotary(self, grid_thw: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin [n_patches, head_dim] for all images, patches in the processor's merge-group order."""
        m = self.config.spatial_merge_size
        rows, cols = [], []
        for t, h, w in grid_thw:
            hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            block = (h // m, m, w // m, m)
            rows.append(np.tile(hh.reshape(block).transpose(0, 2, 1, 3).ravel(), t))
            cols.append(np.tile(ww.reshape(block).transpose(0, 2, 1, 3).ravel(), t))
        row, col = np.concatenate(rows), np.concatenate(cols)
        freqs = np.concatenate([row[:, None] * self.inv_freq, col[:, None] * self.inv_freq], axis=-1)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)

    def __call__(self, pixel_values: np.ndarray, grid_thw: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """pixel_values [sum of patches, patch_dim] of the images in `grid_thw` -> [sum of tokens, hidden]."""
        c = self.config
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        sizes = [t * h * w for t, h, w in grid_thw]
        if pixel_values.shape != (sum(sizes), c.patch_dim):
            raise VlmError(f"pixel_values has shape {pixel_values.shape}, expected ({sum(sizes)}, {c.patch_dim})")
        cos, sin = self.rotary(grid_thw)
        x = self.patch_embed(np.asarray(pixel_values, dtype=np.float32))
        return self.merger(self.run_blocks(x, cos, sin, grid_thw))

    def run_blocks(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                   grid_thw: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """All blocks over the patches of every image, each frame attending only to itself."""
        bounds = frame_bounds(grid_thw)
        for block in self.blocks:
            x = block(x, cos, sin, bounds, self.max_score_bytes)
        return x


def frame_bounds(grid_thw: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """[start, end) patch rows of every frame of every image (t is 1 for still images)."""
    bounds, start = [], 0
    for t, h, w in grid_thw:
        bounds += [(start + i * h * w, start + (i + 1) * h * w) for i in range(t)]
        start += t * h * w
    return bounds


def vision_linear(tensors: Mapping[str, Weight], name: str) -> Linear:
    """`name`.weight (+ .bias); 8-bit vision weights take int8 activations: ~3x the GEMM rate, error
    stated in tests."""
    return Linear(lookup(tensors, name + ".weight"), tensors.get(name + ".bias"), int8_activations=True)


def _as_matrix(weight: Weight, rows: int, cols: int) -> Weight:
    """The Conv3d kernel [out, C, T, P, P] viewed as [out, C * T * P * P] (stored form kept)."""
    if int(np.prod(weight.shape)) != rows * cols:
        raise VlmError(f"patch_embed.proj.weight has shape {tuple(weight.shape)}, expected ({rows}, {cols}) values")
    if isinstance(weight, np.ndarray):
        return weight.reshape(rows, cols)
    if isinstance(weight, HalfWeight):
        return HalfWeight(weight.data.reshape(rows, cols), weight.bf16)
    if tuple(weight.shape) != (rows, cols):
        raise VlmError(f"patch_embed.proj.weight has shape {tuple(weight.shape)}, expected ({rows}, {cols})")
    return weight

