"""transformers' own reading of a GGUF (the reference side of parity tests), done once per process.

transformers parses a GGUF slowly: ~25 s for SmolLM2-135M's model and ~8 s for its tokenizer on
a 2-core machine, and the suite needs them in half a dozen places. Needs torch, transformers and
gguf.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path


def gguf_tokenizer(gguf: str | Path):
    """transformers' fast tokenizer of a GGUF: a fresh copy on each call (callers add tokens)."""
    return copy.deepcopy(_tokenizer(Path(gguf).resolve()))


@functools.cache
def _tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def gguf_causal_lm(gguf: str | Path):
    """transformers' float32 model of a GGUF (weights dequantized by the gguf package), in eval
    mode. Shared by every caller in the process: read it, never change it."""
    return _causal_lm(Path(gguf).resolve())


@functools.cache
def _causal_lm(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
