"""`smolvlm-shapes` as transformers loads it: the bundled directory (tower + connector) plus the
decoder dequantized from the default model's GGUF, written out as one full Idefics3 directory.

The runtime never needs this (it reads the GGUF itself); parity tests and the training
script's evaluation do. Needs torch, transformers and gguf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlm.registry import BUNDLED_MODELS, pull

BUNDLED = BUNDLED_MODELS["smolvlm-shapes"]


def full_checkpoint(out: str | Path, bundled: Path = BUNDLED) -> Path:
    """Write the bundled model with its decoder weights to `out` (model.safetensors in f32)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((bundled / "config.json").read_text())
    gguf = pull(config["vlm_text_gguf"])
    llm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tensors = {f"model.text_model.{k}": v.contiguous() for k, v in llm.model.state_dict().items()}
    tensors.update({k: v.float() for k, v in load_file(str(bundled / "model.safetensors")).items()})
    for f in bundled.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    config.pop("vlm_text_gguf")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
