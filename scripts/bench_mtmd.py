"""Vision encode speed, vlm vs llama.cpp's libmtmd, at real shapes with random weights.

    python scripts/bench_mtmd.py [--models qwen2vl-2b,smolvlm-256m] [--precisions f16,q8] [--threads 2]
                                 [--work DIR] [--repeat 2] [--sizes 448x448,...]

Per model an HF checkpoint is written once under --work: the real vision tower (Qwen2-VL-2B's
ViT: 32 blocks of width 1280 and its merger to 1536; SmolVLM-256M's SigLIP: 12 blocks of width
768, 512-px tiles, pixel shuffle 4 to 576) with random weights ~N(0, 0.02) (saved in float32), and a
one-layer text model of the right width (mtmd needs one for its image markers). llama.cpp's
converter (llama-cpp-python's sdist, vlm.testing.llama_cpp_convert) makes the mmproj at f16 and q8_0
and the text GGUF. Then, on the same image: mtmd's encode of the mmproj, and vlm's encode of the
HF folder loaded with `vision_quantize` f16 / q8. Best of --repeat runs each, one process, the
given threads for both; the relative difference of the two outputs is printed as a check that
both computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Per model: the tiny maker whose tokenizer and processor files are reused, the config changes
# that give the real vision shapes, and the image sizes timed.
MODELS = {
    "qwen2vl-2b": {
        "tiny": "qwen2vl",
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4},
        "text_config": {"hidden_size": 1536, "intermediate_size": 256, "num_hidden_layers": 1,
                        "num_attention_heads": 12, "num_key_value_heads": 2,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
        "sizes": [(448, 448), (896, 896)],
    },
    "smolvlm-256m": {
        "tiny": "smolvlm",
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "image_size": 512, "patch_size": 16},
        "text_config": {"hidden_size": 576, "intermediate_size": 256, "num_hidden_layers": 1,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64},
        "scale_factor": 4,
        "longest_edge": 1024,  # 2 x 2 tiles + the global one, in both (mtmd adds the global one even to 1 tile)
        "sizes": [(1024, 1024)],
    },
}


def make_checkpoint(name: str, out: Path) -> Path:
    """The model's HF folder (kept when it exists)."""
    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        return out
    import torch
    import transformers

    spec = MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        if spec["tiny"] == "qwen2vl":
            from vlm.testing.tiny_qwen2vl import make_tiny_qwen2vl as make
        else:
            from vlm.testing.tiny_smolvlm import make_tiny_smolvlm as make
        tiny = Path(make(Path(tmp) / "tiny"))
        config = json.loads((tiny / "config.json").read_text())
        config["vision_config"].update(spec["vision_config"])
        config["text_config"].update(spec["text_config"])
        config["text_config"].pop("layer_types", None)
        config.pop("scale_factor", None)
        if "scale_factor" in spec:
            config["scale_factor"] = spec["scale_factor"]
        (tiny / "config.json").write_text(json.dumps(config))
        cfg = transformers.AutoConfig.from_pretrained(tiny)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float16)  # 1.3 GB of vision weights instead of 2.7
        try:
            model = transformers.AutoModelForImageTextToText.from_config(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 1 and pname.endswith(".weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(out)
        for f in tiny.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json" and not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    if spec["tiny"] == "smolvlm":  # 512-px tiles of 64 tokens
        p = out / "processor_config.json"
        pc = json.loads(p.read_text())
        tile = spec["vision_config"]["image_size"]
        pc["image_processor"].update({"size": {"longest_edge": spec["longest_edge"]},
                                      "max_image_size": {"longest_edge": tile}})
        pc["image_seq_len"] = (tile // spec["vision_config"]["patch_size"]) ** 2 // spec["scale_factor"] ** 2
        p.write_text(json.dumps(pc, indent=2))
    return out


def best_of(repeat: int, fn, *args):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--precisions", default="f16,q8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sizes", help="only these of the models' image sizes, e.g. 448x448,1024x1024")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vlm-bench-mtmd")
    args = ap.parse_args()

    from PIL import Image

    import vlm
    from vlm import kernels
    from vlm.testing.llama_cpp_convert import Job, convert, fetch_converter
    from vlm.testing.llama_cpp_mtmd import Mtmd

    converter = fetch_converter(args.work / "llama.cpp-sdist")
    print(f"threads {args.threads}, best of {args.repeat}; kernels {kernels.info()['path']}")
    print(f"{'model':>13} {'image':>9} {'tokens':>6} {'weights':>7} {'mtmd s':>7} {'vlm s':>7} {'speedup':>7} "
          f"{'rel diff':>8}")
    for name in args.models.split(","):
        folder = make_checkpoint(name, args.work / name)
        outtypes = {"f16": "f16", "q8": "q8_0"}
        jobs = [Job(folder, args.work, text=outtype == "f16", outtype=outtype)  # the f16 text GGUF, once
                for outtype in {"f16", *(outtypes[p] for p in args.precisions.split(","))}]
        missing = [job for job in jobs if not all(path.is_file() for path in job.outputs() if path)]
        if missing:
            convert(converter, missing)
        text = args.work / f"{name}-f16.gguf"
        for precision in args.precisions.split(","):
            mmproj = Job(folder, args.work, outtype=outtypes[precision]).outputs()[1]
            model = vlm.load(folder, threads=args.threads, vision_quantize=precision)
            with Mtmd(mmproj, text, threads=args.threads) as encoder:
                for w, h in MODELS[name]["sizes"]:
                    if args.sizes and f"{w}x{h}" not in args.sizes.split(","):
                        continue
                    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
                    theirs_s, chunks = best_of(args.repeat, encoder.encode, rgb)
                    theirs = np.concatenate(chunks)
                    image = model.family.preprocess(Image.fromarray(rgb))
                    ours_s, ours = best_of(args.repeat, model.family.embed, [image])
                    diff = float(np.abs(ours - theirs).max() / np.abs(theirs).max()) if ours.shape == theirs.shape \
                        else float("nan")
                    print(f"{name:>13} {w:>4}x{h:<4} {ours.shape[0]:>6} {precision:>7} {theirs_s:>7.2f} {ours_s:>7.2f} "
                          f"{theirs_s / ours_s:>6.2f}x {diff:>8.1e}", flush=True)
            del model


if __name__ == "__main__":
    main()
