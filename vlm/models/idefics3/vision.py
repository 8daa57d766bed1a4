"""Idefics3 / SmolVLM vision tower: SigLIP encoder + pixel-shuffle connector, batched over tiles.

One tile of M x M pixels is (M / patch)^2 patches; each encoder layer is
x += out_proj(attention(layer_norm1(x))); x += fc2(gelu_tanh(fc1(layer_norm2(x)))), then
post_layernorm. The connector folds each scale x scale block of patch features into one vector
(`Idefics3Connector.pixel_shuffle`) and projects it to the text width with a bias-free Linear.

Tiles are independent, so every tile of every image of a request runs through the encoder
together: the Linear layers see all tiles of a chunk as one matrix, attention stays within each
tile. Chunks are bounded by `max_chunk_tokens`, so memory does not grow with the tile count.

Weights: one dict keyed by the checkpoint names with the outer prefixes removed, i.e. the vision
model's names under `model.vision_model.` ("embeddings.patch_embedding.weight",
"encoder.layers.0.self_attn.q_proj.weight", "post_layernorm.weight", ...) together with the
connector's under `model.connector.` ("modality_projection.proj.weight"). Values are float32
arrays, `HalfWeight`s or, for the Linear matrices, `QuantizedWeight`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from vlm.errors import VlmError
from vlm.models.layers import MLP, Attention, LayerNorm, Linear, attend, expect_shape, lookup
from vlm.models.settings import number, text, whole
from vlm.quant import Weight, dequantize

# Tokens per encoder chunk: about 150 MB of activations at SigLIP-base width (two 512-px tiles).
DEFAULT_CHUNK_TOKENS = 2048


@dataclass
class Idefics3VisionConfig:
    """Vision hyper-parameters as in config.json's `vision_config`; defaults are transformers'."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: Mapping) -> Idefics3VisionConfig:
        c = cls()
        ints = {f.name: whole(d, f.name, getattr(c, f.name)) for f in fields(cls) if f.type == "int"}
        return cls(**ints, hidden_act=text(d, "hidden_act", c.hidden_act),
                   layer_norm_eps=number(d, "layer_norm_eps", c.layer_norm_eps))


class Idefics3EncoderLayer:
    def __init__(self, self_attn: Attention, mlp: MLP, layer_norm1: LayerNorm, layer_norm2: LayerNorm):
        self.self_attn, self.mlp = self_attn, mlp
        self.layer_norm1, self.layer_norm2 = layer_norm1, layer_norm2

    def __call__(self, x: np.ndarray, tile_tokens: int) -> np.ndarray:
        """x [n_tiles * tile_tokens, hidden]; each tile attends only to itself."""
        q, k, v = self.self_attn.qkv(self.layer_norm1(x), None, None)
        o = np.empty(q.shape, dtype=np.float32)
        for s in range(0, x.shape[0], tile_tokens):
            o[:, s:s + tile_tokens] = attend(q[:, s:s + tile_tokens], k[:, s:s + tile_tokens],
                                             v[:, s:s + tile_tokens], causal_offset=None)
        x = x + self.self_attn.output(o)
        return x + self.mlp(self.layer_norm2(x))


def pixel_shuffle(x: np.ndarray, scale_factor: int) -> np.ndarray:
    """[tiles, seq, d] -> [tiles, seq / s^2, d * s^2], ordered as `Idefics3Connector.pixel_shuffle`.

    Output token (i, j) of the (side / s)^2 grid is the concatenation, row by row of its
    s x s block, of the patch features at (i * s + di, j * s + dj).
    """
    n, seq, d = x.shape
    side = int(round(seq**0.5))
    s = scale_factor
    if side * side != seq or side % s:
        raise VlmError(f"cannot pixel-shuffle {seq} patches by {s}: need a square grid divisible by {s}")
    x = x.reshape(n, side // s, s, side // s, s, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, seq // (s * s), d * s * s)


def position_ids(patches_h: int, patches_w: int, patches_per_side: int) -> np.ndarray:
    """Position-embedding rows for a full tile of patches_h x patches_w patches.

    transformers buckets each patch's fractional coordinate into the trained side x side grid
    (`Idefics3VisionEmbeddings`); in exact arithmetic that is floor(i * side / patches). For a
    tile of the trained size it is the identity. (transformers computes it in float32 and, for a
    few odd grid sizes such as 19 or 25, float rounding moves a patch one bucket down; the real
    checkpoints' grids, 32 and 26, and powers of two are exact.)
    """
    rows = np.arange(patches_h) * patches_per_side // patches_h
    cols = np.arange(patches_w) * patches_per_side // patches_w
    return (rows[:, None] * patches_per_side + cols[None, :]).reshape(-1)


class Idefics3VisionModel:
    """SigLIP encoder + connector: tiles [n, 3, M, M] -> text-width features [n, tokens, text_hidden]."""

    def __init__(self, config: Idefics3VisionConfig, scale_factor: int, tensors: Mapping[str, Weight],
                 max_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        self.config = c = config
        self.scale_factor = int(scale_factor)
        self.max_chunk_tokens = int(max_chunk_tokens)
        if c.hidden_size % c.num_attention_heads:
            raise VlmError(f"vision width {c.hidden_size} is not divisible by {c.num_attention_heads} heads")

        def w(name: str) -> Weight:
            return lookup(tensors, name)

        def linear(name: str) -> Linear:
            # 8-bit vision weights take int8 activations: ~3x the GEMM rate, error stated in tests.
            return Linear(w(name + ".weight"), dequantize(w(name + ".bias")), int8_activations=True)

        def norm(name: str) -> LayerNorm:
            return LayerNorm(dequantize(w(name + ".weight")), dequantize(w(name + ".bias")), c.layer_norm_eps)

        # The Conv2d with kernel = stride = patch is one matmul over flattened (channel, y, x) patches.
        conv = w("embeddings.patch_embedding.weight")
        expected = (c.hidden_size, c.num_channels, c.patch_size, c.patch_size)
        if tuple(conv.shape) != expected:
            raise VlmError(f"patch embedding has shape {tuple(conv.shape)}, expected {expected}")
        self.patch_embedding = Linear(dequantize(conv).reshape(c.hidden_size, -1),
                                      dequantize(w("embeddings.patch_embedding.bias")))
        self.position_embedding = dequantize(w("embeddings.position_embedding.weight"))
        self.patches_per_side = c.image_size // c.patch_size

        head_dim = c.hidden_size // c.num_attention_heads
        self.layers = []
        for i in range(c.num_hidden_layers):
            p = f"encoder.layers.{i}."
            attn = Attention(linear(p + "self_attn.q_proj"), linear(p + "self_attn.k_proj"),
                             linear(p + "self_attn.v_proj"), linear(p + "self_attn.out_proj"),
                             c.num_attention_heads, c.num_attention_heads, head_dim)
            mlp = MLP(linear(p + "mlp.fc1"), linear(p + "mlp.fc2"), c.hidden_act)
            norms = norm(p + "layer_norm1"), norm(p + "layer_norm2")
            self.layers.append(Idefics3EncoderLayer(attn, mlp, *norms))
        self.post_layernorm = norm("post_layernorm")
        self.modality_projection = Linear(w("modality_projection.proj.weight"), int8_activations=True)  # no bias
        width = self.modality_projection.shape[1]
        if width != c.hidden_size * self.scale_factor**2:
            raise VlmError(f"connector expects {width} features, the encoder gives "
                           f"{c.hidden_size} x {self.scale_factor}^2")
        self.check_widths()

    def check_widths(self) -> None:
        """VlmError unless every matrix and norm takes the width the step before it gives."""
        c, e = self.config, self.config.hidden_size
        expect_shape("embeddings.position_embedding.weight", self.position_embedding.shape,
                     (self.patches_per_side**2, e))
        for i, layer in enumerate(self.layers):
            p = f"encoder.layers.{i}."
            a = layer.self_attn
            for name, m in (("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj), ("out_proj", a.o_proj)):
                expect_shape(f"{p}self_attn.{name}.weight", m.shape, (e, e))
            expect_shape(p + "mlp.fc1.weight", layer.mlp.fc1.shape, (c.intermediate_size, e))
            expect_shape(p + "mlp.fc2.weight", layer.mlp.fc2.shape, (e, c.intermediate_size))
            for name in ("layer_norm1", "layer_norm2"):
                expect_shape(f"{p}{name}.weight", getattr(layer, name).weight.shape, (e,))
        expect_shape("post_layernorm.weight", self.post_layernorm.weight.shape, (e,))

    @property
    def out_features(self) -> int:
        return self.modality_projection.out_features

    def tokens_per_tile(self, tile_size: int) -> int:
        return (tile_size // self.config.patch_size) ** 2 // self.scale_factor**2

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values float32 [n, 3, M, M] -> [n, tokens_per_tile(M), text_hidden], in tile order."""
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels:
            raise VlmError(f"pixel values must be [tiles, {c.num_channels}, H, W], got {pixel_values.shape}")
        n, _, height, width = pixel_values.shape
        p = c.patch_size
        if height != width or height % p or (height // p) % self.scale_factor:
            raise VlmError(f"tiles must be square with a side divisible by {p * self.scale_factor}, "
                           f"got {height}x{width}")
        tile_tokens = (height // p) ** 2
        pos = self.position_embedding[position_ids(height // p, width // p, self.patches_per_side)]
        per_chunk = max(1, self.max_chunk_tokens // tile_tokens)
        out = np.empty((n, tile_tokens // self.scale_factor**2, self.out_features), dtype=np.float32)
        for s in range(0, n, per_chunk):
            out[s:s + per_chunk] = self._encode(pixel_values[s:s + per_chunk], pos)
        return out

    def _encode(self, tiles: np.ndarray, pos: np.ndarray) -> np.ndarray:
        n, ch, size, _ = tiles.shape
        p = self.config.patch_size
        g = size // p
        # [n, c, gy, p, gx, p] -> [n, gy, gx, c, p, p]: patches row-major, each flattened as the conv weight.
        patches = tiles.reshape(n, ch, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n * g * g, ch * p * p)
        x = self.patch_embedding(np.ascontiguousarray(patches, dtype=np.float32))
        x = (x.reshape(n, g * g, -1) + pos).reshape(n * g * g, -1)
        for layer in self.layers:
            x = layer(x, g * g)
        x = self.post_layernorm(x).reshape(n, g * g, -1)
        x = pixel_shuffle(x, self.scale_factor)
        return self.modality_projection(x.reshape(-1, x.shape[-1])).reshape(n, x.shape[1], -1)
