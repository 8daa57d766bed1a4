"""The Qwen2.5-VL vision tower: Qwen2-VL's ViT with window attention, RMSNorm and a gated SiLU MLP.

What differs from Qwen2-VL (whose patch embedding, 2D rotary, attention block, merger and
batching are reused as they are):

- Most blocks attend inside windows of `window_size` pixels (112 = 4 x 4 merged tokens); the
  blocks in `fullatt_block_indexes` attend over the whole frame. For this the patches are put
  in window order once, before the blocks (each window's merge groups contiguous, windows
  row-major, a window cut short at the right or bottom edge when the grid is not a multiple
  of it), and back in the processor's order after them. Attention is then block-diagonal
  over windows, or over frames: the reordering never moves a patch out of its frame.
- Norms are RMSNorm (no bias), the MLP is down(silu(gate(x)) * up(x)) with biases, and the
  merger's norm (ln_q) is RMSNorm too.
- Config keys: `hidden_size` is the ViT width and `out_hidden_size` the merger's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlm.errors import VlmError
from vlm.models.layers import GatedMLP, RMSNorm, lookup
from vlm.models.qwen2_vl.vision import (
    LAYER_NORM_EPS,
    Qwen2VisionTransformer,
    frame_bounds,
    vision_linear,
)
from vlm.models.qwen2_vl.vision import VisionConfig as Qwen2VisionConfig
from vlm.models.settings import text, whole, wholes
from vlm.quant import Weight


@dataclass
class VisionConfig(Qwen2VisionConfig):
    """Qwen2-VL's vision config plus the window settings and the MLP width (mlp_ratio is unused).

    Field names are Qwen2-VL's: `embed_dim` is the ViT width, `hidden_size` the merger's output.
    Defaults are transformers' `Qwen2_5_VLVisionConfig`'s.
    """

    embed_dim: int = 3584
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    window_size: int = 112  # in pixels
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)

    @classmethod
    def from_dict(cls, d: Mapping) -> VisionConfig:
        """Read the hub's or transformers 5's `vision_config` (same keys, `in_chans` or `in_channels`)."""
        c = cls()
        base = super().from_dict({**d, "embed_dim": d.get("hidden_size", c.embed_dim),
                                  "hidden_size": d.get("out_hidden_size", c.hidden_size)})
        config = dataclasses.replace(
            base,
            hidden_act=text(d, "hidden_act", c.hidden_act),
            intermediate_size=whole(d, "intermediate_size", c.intermediate_size),
            window_size=whole(d, "window_size", c.window_size),
            fullatt_block_indexes=wholes(d, "fullatt_block_indexes", c.fullatt_block_indexes),
        )
        if config.window_tokens < 1:
            raise VlmError(f"vision window_size {config.window_size} is smaller than one merged token "
                           f"({config.patch_size * config.spatial_merge_size} px)")
        return config

    @property
    def window_tokens(self) -> int:
        """Side of an attention window in merged tokens (4 for 112 px, patch 14, merge 2)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def window_order(grid_thw: Sequence[tuple[int, int, int]], merge: int, window: int
                 ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(merged-token order, window spans): transformers' `get_window_index` for these images.

    order[i] is the merged token (over all images, processor order) placed i-th; each window
    is a [start, end) span of patch rows in that order. Windows run row-major over each frame's
    grid of merged tokens; those on the right and bottom edges hold what is left of the grid.
    """
    unit = merge * merge
    order, spans = [], []
    first = 0  # merged tokens of the previous images
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        padded = np.full((t, nh * window, nw * window), -1, dtype=np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
        kept = windows >= 0
        order.append(windows[kept] + first)
        ends = (first + np.cumsum(kept.sum(axis=1))) * unit  # no window is empty: the grid is padded by < window
        spans += zip([first * unit, *ends[:-1].tolist()], ends.tolist(), strict=True)
        first += t * gh * gw
    return np.concatenate(order), spans


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    """Qwen2.5-VL's ViT: pixel patches of one or more images -> merged tokens in the text width."""

    config: VisionConfig

    def norm(self, tensors: Mapping[str, Weight], name: str) -> RMSNorm:
        """RMSNorm, no bias (blocks and merger alike)."""
        return RMSNorm(lookup(tensors, name + ".weight"), LAYER_NORM_EPS)

    def mlp(self, tensors: Mapping[str, Weight], prefix: str) -> GatedMLP:
        """down(act(gate(x)) * up(x)), all three with biases."""
        return GatedMLP(vision_linear(tensors, prefix + "gate_proj"), vision_linear(tensors, prefix + "up_proj"),
                        vision_linear(tensors, prefix + "down_proj"), self.config.hidden_act)

    def run_blocks(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                   grid_thw: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """The blocks in window order: window attention, or frame attention in the full-attention blocks."""
        c = self.config
        unit = c.spatial_merge_size ** 2
        order, windows = window_order(grid_thw, c.spatial_merge_size, c.window_tokens)
        rows = (order[:, None] * unit + np.arange(unit)).ravel()  # each merged token's patches stay together
        x, cos, sin = x[rows], cos[rows], sin[rows]
        frames = frame_bounds(grid_thw)
        full = set(c.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in full else windows, self.max_score_bytes)
        out = np.empty_like(x)
        out[rows] = x
        return out
