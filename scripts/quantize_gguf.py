"""Re-quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`).

    python scripts/quantize_gguf.py SRC.gguf OUT_DIR [--types Q4_K_M,Q5_K_M,Q6_K,IQ4_NL,Q8_0]

Writes OUT_DIR/<src stem>.<TYPE>.gguf per type (kept when already there). The real SmolLM2 is
Q4_1, so this requantizes (`allow_requantize`): the files hold llama.cpp's tensor mix for each type,
including its fallbacks for widths that are not multiples of 256 (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "Q8_0", "Q5_0", "Q5_1")


def quantize(src: Path, out_dir: Path, kind: str, threads: int = 2) -> Path:
    """OUT_DIR/<stem>.<kind>.gguf made from src by llama.cpp (kept if it exists)."""
    import llama_cpp

    stem = src.name.removesuffix(".gguf").rsplit(".", 1)[0]
    dst = out_dir / f"{stem}.{kind}.gguf"
    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True
    params.nthread = threads
    part = dst.with_suffix(f".{os.getpid()}.part")  # test sessions may share the folder
    if llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    os.replace(part, dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--types", default=",".join(TYPES[:5]))
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for kind in args.types.split(","):
        print(quantize(args.src, args.out_dir, kind))


if __name__ == "__main__":
    main()
