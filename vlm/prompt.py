"""A request as the decoder sees it: segments of text token ids and runs of image embedding rows.

The chat template writes one placeholder per image. The rendered text is split on it; each image
becomes its family's slot (`VisionFamily.image_slot`: marker text around runs of embedding rows),
and each text run is tokenized. Token ids, image rows, prefix-cache keys and positions are all
read from the segments' offsets: nothing is expanded into text and searched for again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlm.errors import VlmError


@dataclass(frozen=True)
class TextSegment:
    """Token ids of text (template, markers, the user's words)."""

    ids: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.ids.size)


@dataclass(frozen=True)
class ImageSegment:
    """`rows` embedding rows of one image, starting at its row `start` (a family may split an
    image's rows into several runs between marker tokens, e.g. one per tile)."""

    image: Any  # the family's ProcessedImage
    start: int
    rows: int
    token_id: int  # the id these positions hold in the prompt's ids (the family's image token)

    def __len__(self) -> int:
        return self.rows


Segment = TextSegment | ImageSegment
# An image slot as a family writes it: marker text, and counts of embedding rows, in order.
ImageSlot = list[str | int]


def segment_text(text: str, images: Sequence, placeholder: str, slot: Callable[[Any], ImageSlot],
                 token_id: int, encode: Callable[[str, bool | None], list[int]],
                 add_bos: bool | None) -> list[Segment]:
    """Segments of templated `text` whose i-th `placeholder` stands for images[i].

    Adjacent strings are joined and each run is tokenized whole. A run that follows image rows
    is tokenized behind one placeholder, which is dropped again: the tokenizer then sees exactly
    the context it would see in the whole expanded text (a special token before the run), so the
    ids are the ones tokenizing the expanded text gives.
    """
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(images):
        raise VlmError(f"the prompt has {len(pieces) - 1} image placeholder(s) ({placeholder}) but "
                       f"{len(images)} image(s) were given")
    items: list = [pieces[0]]
    for image, piece in zip(images, pieces[1:], strict=True):
        start = 0
        for part in slot(image):
            if isinstance(part, str):
                items.append(part)
            else:
                items.append(ImageSegment(image, start, int(part), token_id))
                start += int(part)
        items.append(piece)
    segments: list[Segment] = []
    run: list[str] = []
    first = True

    def close_run() -> None:
        nonlocal first
        if not run and not first:
            return
        joined = "".join(run)
        if first:
            ids = encode(joined, add_bos)
            first = False
        else:
            ids = encode(placeholder + joined, False)[1:]
        run.clear()
        if ids:
            segments.append(TextSegment(np.asarray(ids, dtype=np.int64)))

    for item in items:
        if isinstance(item, str):
            run.append(item)
        else:
            close_run()
            segments.append(item)
    close_run()
    return segments


def prompt_ids(segments: Sequence[Segment]) -> np.ndarray:
    """The token ids of the whole prompt (image rows hold their family's image token id)."""
    parts = [s.ids if isinstance(s, TextSegment) else np.full(s.rows, s.token_id, np.int64) for s in segments]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def prompt_keys(segments: Sequence[Segment]) -> list:
    """What each position holds, for prefix reuse: a token id, or (image digest, embedding row)."""
    keys: list = []
    for s in segments:
        if isinstance(s, TextSegment):
            keys += s.ids.tolist()
        else:
            keys += [(s.image.digest, s.start + j) for j in range(s.rows)]
    return keys


def image_rows(segments: Sequence[Segment]) -> np.ndarray:
    """Prompt offsets that take image embedding rows, in the order the images' rows come."""
    rows, offset = [], 0
    for s in segments:
        if isinstance(s, ImageSegment):
            rows.append(np.arange(offset, offset + s.rows, dtype=np.int64))
        offset += len(s)
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def text_positions(segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
    """Plain 1-D positions 0..n-1 and rope offset 0 (every family without multimodal RoPE)."""
    return np.arange(sum(len(s) for s in segments), dtype=np.int64), 0
