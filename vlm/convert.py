"""`vlm convert`: any supported checkpoint -> our memory-mapped quantized format, with a report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlm.errors import VlmError
from vlm.formats.checkpoint import VISION_PREFIX
from vlm.formats.native import write_native
from vlm.formats.reader import read_checkpoint
from vlm.loader import prepare_tensors
from vlm.registry import resolve


@dataclass
class ConvertReport:
    source_bytes: int
    output_bytes: int
    quantize: str
    vision: str | None
    errors: dict[str, float] = field(default_factory=dict)  # relative RMS error per quantized tensor

    def summary(self) -> str:
        lines = [f"size: {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB "
                 f"({100 * (1 - self.output_bytes / max(self.source_bytes, 1)):.0f}% smaller)",
                 f"decoder: {self.quantize}; vision: {self.vision or 'as stored'}"]
        if self.errors:
            e = np.array(list(self.errors.values()))
            worst = max(self.errors, key=self.errors.get)
            lines.append(f"quantization error (relative RMS) over {e.size} tensors: mean {e.mean():.4f}, "
                         f"median {np.median(e):.4f}, max {e.max():.4f} ({worst})")
        else:
            lines.append("no tensor was re-quantized (the source already held these precisions)")
        return "\n".join(lines)


# --bits and --vision-bits -> the load-time precision modes they mean (see vlm.quant.QUANTIZE_MODES).
DECODER_BITS = {4: "q4", 8: "q8"}
VISION_BITS = {None: None, 8: "q8", 16: "f16", 32: "f32"}


def _nbytes(tensors: dict) -> int:
    return sum(int(w.nbytes) for w in tensors.values())


def convert(src: str | os.PathLike, dst: str | os.PathLike, bits: int = 4, group_size: int = 32,
            symmetric: bool = False, vision_bits: int | None = None, progress: bool = False) -> ConvertReport:
    """Convert `src` (GGUF, HF directory, converted model or known name) into `dst`.

    bits 4 or 8 for the decoder's linear layers (embeddings 8-bit); vision_bits 8, 16 or 32
    for the vision tower (None keeps its stored precision). `progress` shows progress bars.
    """
    if bits not in DECODER_BITS:
        raise VlmError(f"--bits must be 4 or 8, got {bits}")
    if vision_bits not in VISION_BITS:
        raise VlmError(f"--vision-bits must be 8, 16 or 32, got {vision_bits}")
    mode = "q4_sym" if bits == 4 and symmetric else DECODER_BITS[bits]
    dst = Path(dst)
    src_path = resolve(src)
    if dst.resolve() == src_path.resolve():
        raise VlmError("the destination must differ from the source")
    if dst.exists() and any(dst.iterdir()) and not (dst / "vlm_config.json").is_file():
        raise VlmError(f"{dst} exists and is not a converted model; refusing to write into it")
    ckpt = read_checkpoint(src_path)
    errors: dict[str, float] = {}
    _, text, vision = prepare_tensors(ckpt, mode, VISION_BITS[vision_bits], group_size, errors)
    tensors = {}  # each tensor is converted as it is looked up here
    with tqdm(total=len(text) + len(vision), desc="converting", unit="tensor", leave=False,
              disable=not progress) as bar:
        for prefix, part in (("", text), (VISION_PREFIX, vision)):
            for name in part:
                tensors[prefix + name] = part[name]
                bar.update()
    quantization = {"decoder": mode, "group_size": group_size, "vision": VISION_BITS[vision_bits]}
    out = write_native(dst, ckpt.config, tensors, ckpt.files, quantization)
    return ConvertReport(_nbytes(ckpt.tensors), out, mode, VISION_BITS[vision_bits], errors)
