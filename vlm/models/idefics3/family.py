"""The Idefics3 family (SmolVLM-256M/500M-Instruct, SmolVLM2, Idefics3-8B): what the model glue needs.

A checkpoint's config.json has `model_type: idefics3` (SmolVLM2: `smolvlm`, the same layout and
image processing; its video input is not supported) with nested `vision_config` (SigLIP) and
`text_config` (Llama); its tensors live under `model.vision_model.`, `model.connector.`,
`model.text_model.` and `lm_head.` (the hub checkpoints and transformers 5 `save_pretrained`
alike). Each `<image>` of the chat template expands to tiles of `<image>` tokens (see
`image_slot`); the decoder uses plain 1-D positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from vlm.errors import VlmError
from vlm.formats.checkpoint import VISION_PREFIX
from vlm.models.family import ProcessedImage, VisionFamily
from vlm.models.idefics3.processor import DEFAULT_MAX_TILES, Idefics3ImageProcessor
from vlm.models.idefics3.vision import DEFAULT_CHUNK_TOKENS, Idefics3VisionConfig, Idefics3VisionModel
from vlm.models.settings import section, whole
from vlm.prompt import ImageSlot
from vlm.quant import Weight


class Idefics3Family(VisionFamily):
    """Preprocessing, vision encoding and image slots for Idefics3 checkpoints.

    `preprocessor_config` is preprocessor_config.json merged with processor_config.json (either
    may be empty; a nested "image_processor" section, as some processor_config.json files carry,
    is read too). Missing values fall back to the reference's defaults, and tile sizes to the
    legacy `vision_config.max_image_size` / `size` of the hub configs.
    """

    image_token = "<image>"
    fake_image_token = "<fake_token_around_image>"
    global_image_token = "<global-img>"
    default_image_token_id = 128257
    image_options = ("max_tiles",)
    tensor_map = {"model.vision_model.": VISION_PREFIX, "model.connector.": VISION_PREFIX,
                  "model.text_model.": "model.", "lm_head.": "lm_head."}
    text_model_types = ("llama",)
    # Defaults of transformers' LlamaConfig, except rms_norm_eps, which Idefics3Config sets to 1e-5.
    text_defaults = {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "hidden_act": "silu", "attention_bias": False,
    }

    def __init__(self, config: Mapping, vision_tensors: Mapping[str, Weight], preprocessor_config: Mapping,
                 max_tiles: int = DEFAULT_MAX_TILES, max_chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__(config, vision_tensors, preprocessor_config)
        vision = dict(section(config, "vision_config"))
        self.vision_config = Idefics3VisionConfig.from_dict(vision)
        self.scale_factor = whole(config, "scale_factor", 2)
        self.vision = Idefics3VisionModel(self.vision_config, self.scale_factor, vision_tensors,
                                          max_chunk_tokens)

        pre = {**vision, **preprocessor_config, **section(preprocessor_config, "image_processor")}
        tile = whole(section(pre, "max_image_size"), "longest_edge", self.vision_config.image_size)
        self.image_seq_len = self.vision.tokens_per_tile(tile)
        declared = pre.get("image_seq_len", self.image_seq_len)
        if declared != self.image_seq_len:
            raise VlmError(f"processor image_seq_len {declared} does not match the vision tower's "
                           f"{self.image_seq_len} tokens per {tile}-px tile")
        self.processor = Idefics3ImageProcessor.from_config(pre, self.image_seq_len, tile, max_tiles)

    @classmethod
    def text_overrides(cls, text: dict, config: Mapping) -> dict:
        # transformers ties lm_head by the outer config's flag (Idefics3Config defaults it off).
        return {"tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}

    def preprocess(self, image: Image.Image, max_tiles: int | None = None) -> ProcessedImage:
        """Tiles of one image, at most `max_tiles` (default: the family's, 17) counting the global one."""
        return self.processor(image, max_tiles)

    def embed(self, images: Sequence[ProcessedImage]) -> np.ndarray:
        feats = self.vision(np.concatenate([im.pixels for im in images]))  # [tiles, tokens per tile, hidden]
        return feats.reshape(-1, feats.shape[-1])

    def image_slot(self, image: ProcessedImage) -> ImageSlot:
        """What one `<image>` placeholder stands for (`Idefics3Processor.replace_image_token`):
        each tile's rows after a row/column marker, then the global view's."""
        fake, rows = self.fake_image_token, self.image_seq_len
        slot: ImageSlot = []
        grid_rows, grid_cols = image.grid
        for r in range(1, grid_rows + 1):
            for c in range(1, grid_cols + 1):
                slot += [f"{fake}<row_{r}_col_{c}>", rows]
            slot.append("\n")
        if grid_rows:
            slot.append("\n")
        return slot + [f"{fake}{self.global_image_token}", rows, fake]
