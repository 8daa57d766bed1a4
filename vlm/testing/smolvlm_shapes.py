"""`smolvlm-shapes` as transformers loads it: the bundled directory (tower, connector and the
decoder's LoRA adapters) plus the decoder dequantized from the default model's GGUF with the
adapters merged (W + B A, as vlm's loader does), written out as one full Idefics3 directory.

The runtime never needs this (it reads the GGUF itself); parity tests and the training
script's evaluation do. Needs torch, transformers and gguf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlm.registry import BUNDLED_MODELS, pull
from vlm.testing.transformers_gguf import gguf_causal_lm

BUNDLED = BUNDLED_MODELS["smolvlm-shapes"]


def full_checkpoint(out: str | Path, bundled: Path = BUNDLED) -> Path:
    """Write the bundled model with its decoder weights to `out` (model.safetensors in f32)."""
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((bundled / "config.json").read_text())
    gguf = pull(config["vlm_text_gguf"])
    llm = gguf_causal_lm(gguf)
    tensors = {f"model.text_model.{k}": v.contiguous() for k, v in llm.model.state_dict().items()}
    own = load_file(str(bundled / "model.safetensors"))
    for name, v in own.items():
        if name.endswith(".lora_A.weight"):
            target = name.removesuffix(".lora_A.weight")
            delta = own[target + ".lora_B.weight"].float() @ v.float()
            tensors[target + ".weight"] = tensors[target + ".weight"] + delta
        elif not name.endswith(".lora_B.weight"):
            tensors[name] = v.float()
    for f in bundled.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    config.pop("vlm_text_gguf")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def ask(model, image, question: str, max_new_tokens: int = 40) -> str:
    """vlm's greedy answer to a question about one image (the image first, as in training)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return model.generate(messages, images=[image], max_new_tokens=max_new_tokens).text.strip()


def transformers_agreement(model, questions, work_dir: str | Path) -> tuple[int, int]:
    """(questions whose greedy answers are equal, questions): `model` (a vlm Model of the bundled
    checkpoint, e.g. loaded with quantize="f32") against transformers on the full checkpoint.
    `questions` as vlm.testing.shapes.held_out_questions gives them; prompt ids must be equal."""
    import torch
    import transformers

    full = full_checkpoint(work_dir, Path(model.info["path"]))
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(str(full), dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(full))
    same = 0
    for _, image, question, _ in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           images=[[image]], return_tensors="pt")
        ours = model.prepare(messages, [image]).ids.tolist()
        if inputs["input_ids"][0].tolist() != ours:
            raise AssertionError(f"prompt ids differ for {question!r}")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=40, do_sample=False)
        want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        same += ask(model, image, question) == want.strip()
    return same, len(questions)
