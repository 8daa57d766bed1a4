"""The vision-family contract: what a vision-language family gives the shared runtime.

A family (models/<name>/family.py) subclasses `VisionFamily` and registers its config
`model_type` in `vlm.models.FAMILIES`. It declares, and the base does the rest once:

- `tensor_map`: checkpoint prefix -> our prefix ("vision." for the image side, "model." /
  "lm_head." for the decoder); `split_tensors` applies it.
- `text_model_type`, `text_defaults` and `text_overrides`: only what its decoder config differs
  in from a plain Hugging Face Llama/Qwen2 config; `text_config` does the rest.
- `image_token` (the placeholder the chat template writes once per image), `image_token_id`,
  `image_options` (the keyword options `preprocess` takes per call).

and writes:

- `__init__(config, vision_tensors, preprocessor_config)`: build the tower from the checkpoint;
- `preprocess(image, **image_options) -> ProcessedImage` (pixels, embedding rows, digest, grid);
- `embed(images) -> [sum of rows, text hidden]`: every image's rows through the tower in one
  batched pass (`encode` splits them per image);
- `image_slot(image)` if an image is more than one run of rows in place of its placeholder;
- `positions(segments)` if the decoder's positions are not plain 0..n-1 (M-RoPE).

Room left, not built yet:
- features that enter the decoder past the input embeddings (Qwen3-VL's deepstack): `embed`
  would also return per-layer feature rows, carried like `PromptInputs.image_embeds` and added
  by the decoder at those layers;
- video: a `ProcessedImage` whose `grid` has more than one frame (Qwen2-VL's grid t), with a
  `preprocess_video` producing it; segments, keys and positions already handle any grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from vlm.errors import VlmError, shown
from vlm.formats.checkpoint import VISION_PREFIX
from vlm.models.llama import TextConfig
from vlm.models.settings import section, whole
from vlm.prompt import ImageSlot, Segment, text_positions
from vlm.quant import Weight


@dataclass
class ProcessedImage:
    """One image ready for its family's vision tower."""

    pixels: np.ndarray  # what the tower takes (the family's layout: patches, tiles)
    rows: int  # embedding rows the image becomes in the prompt
    digest: str  # sha256 of the pixels and every setting that shaped them: the image cache's key
    grid: tuple[int, ...]  # the family's layout: Qwen2-VL (t, h, w) in patches, Idefics3 (tile rows, cols)


class VisionFamily:
    """Base of every vision-language family; see the module docstring for the contract."""

    image_token: ClassVar[str]
    default_image_token_id: ClassVar[int]  # used when config.json has no image_token_id
    image_options: ClassVar[tuple[str, ...]] = ()
    # An image written into a message's text, for chat templates that do not place image parts
    # (llama.cpp text GGUFs may carry a text model's): llama.cpp mtmd's markup; None: the placeholder.
    image_markup: ClassVar[str | None] = None
    tensor_map: ClassVar[dict[str, str]]  # first matching prefix wins: list specific ones first
    text_model_type: ClassVar[str] = "llama"  # the decoder architecture (vlm.models.llama)
    text_model_types: ClassVar[tuple[str, ...]] = ()  # text_config model_types accepted (empty: any)
    text_defaults: ClassVar[dict[str, Any]] = {}  # the HF config class's defaults for omitted keys

    def __init__(self, config: Mapping, vision_tensors: Mapping[str, Weight], preprocessor_config: Mapping):
        self.image_token_id = whole(config, "image_token_id", self.default_image_token_id, low=0)

    # --- from the checkpoint ----------------------------------------------------------------

    @classmethod
    def split_tensors(cls, tensors: Mapping[str, Weight]) -> tuple[dict[str, Weight], dict[str, Weight]]:
        """(vision tensors named without prefix, decoder tensors named `model.*` / `lm_head.*`)."""
        vision, text = {}, {}
        for name, w in tensors.items():
            for prefix, ours in cls.tensor_map.items():
                if name.startswith(prefix):
                    new = ours + name[len(prefix):]
                    if new.startswith(VISION_PREFIX):
                        vision[new[len(VISION_PREFIX):]] = w
                    else:
                        text[new] = w
                    break
        return vision, text

    @classmethod
    def text_config(cls, config: Mapping) -> dict:
        """The decoder's config as a flat Hugging Face Llama/Qwen2 config dict (TextConfig's keys).

        Reads the nested `text_config` (transformers 5, Idefics3) or the flat hub layout; the rope
        section may sit in either, under `rope_parameters` or `rope_scaling`.
        """
        src = dict(section(config, "text_config") or config)
        if cls.text_model_types and src.get("model_type", cls.text_model_type) not in cls.text_model_types:
            raise VlmError(f"unsupported text model {src.get('model_type')!r} (expected "
                           f"{' or '.join(cls.text_model_types)})")
        names = {f.name for f in fields(TextConfig)}
        out = {**cls.text_defaults, **{k: v for k, v in src.items() if k in names}}
        out["model_type"] = cls.text_model_type
        rope = next((r for r in (src.get("rope_parameters"), src.get("rope_scaling"), config.get("rope_scaling")) if r),
                    {})
        if not isinstance(rope, Mapping):
            raise VlmError(f"bad model config: rope settings must be an object, got {shown(repr(rope))}")
        rope = dict(rope)
        out["rope_theta"] = rope.get("rope_theta", out.get("rope_theta", 10000.0))  # TextConfig.validate checks it
        if rope.get("mrope_section"):
            out["mrope_section"] = rope["mrope_section"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        out["rope_scaling"] = rope if kind not in ("default", "mrope") else None
        out["num_key_value_heads"] = out.get("num_key_value_heads") or out.get("num_attention_heads")
        if out.get("head_dim") is None:  # TextConfig.from_dict names a missing width
            out["head_dim"] = whole(out, "hidden_size", 0, low=0) // whole(out, "num_attention_heads", 1)
        out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", src.get("tie_word_embeddings", False)))
        out.update(cls.text_overrides(out, config))
        return out

    @classmethod
    def text_overrides(cls, text: dict, config: Mapping) -> dict:
        """Fields the family fixes whatever the text config says (e.g. Qwen2-VL's head_dim)."""
        return {}

    # --- per request ------------------------------------------------------------------------

    def preprocess(self, image, **image_options) -> ProcessedImage:
        """Pixels of one RGB-convertible PIL image as the tower takes them."""
        raise NotImplementedError

    def embed(self, images: Sequence[ProcessedImage]) -> np.ndarray:
        """Every image's embedding rows, in order, from one batched pass: [sum of rows, text hidden]."""
        raise NotImplementedError

    def encode(self, images: Sequence[ProcessedImage]) -> list[np.ndarray]:
        """Embeddings [rows_i, text hidden] of each image, all from one batched pass."""
        if not images:
            return []
        out = self.embed(images)
        # Copies, so a cached image's rows do not pin the whole batch's array.
        return [part.copy() for part in np.split(out, np.cumsum([im.rows for im in images])[:-1])]

    def image_slot(self, image: ProcessedImage) -> ImageSlot:
        """What one placeholder stands for: marker text and runs of embedding rows (default:
        all the image's rows in one run)."""
        return [image.rows]

    def positions(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """Decoder positions of a prompt and the rope offset of what follows (default: 0..n-1, 0)."""
        return text_positions(segments)
