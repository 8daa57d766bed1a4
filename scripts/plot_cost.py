"""How cost grows with prompt length, context depth and image size: measure, save JSON, draw a PNG.

    python scripts/plot_cost.py [--threads 2] [--reps 3] [--json docs/cost.json] [--png docs/cost.png]
    python scripts/plot_cost.py --from-json docs/cost.json      # redraw only

Text: SmolLM2-135M-Instruct Q4_1 (the real model), `vlm bench`'s prefill at several prompt
lengths and its decode (64 tokens) at several context depths. Vision: the Qwen2-VL-2B ViT at
its real shapes (all 32 blocks, random weights, 8-bit weights + int8 activations as
`vision_quantize="q8"`) encoding square images of several sizes, the time to first token's
vision part. The PNG is drawn with Pillow alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [32, 64, 128, 256, 512, 1024, 2048]
DEPTHS = [0, 256, 512, 1024, 2048, 3072]
IMAGE_SIDES = [224, 336, 448, 560, 672, 896]


def measure(threads: int, reps: int) -> dict:
    import numpy as np
    from PIL import Image

    import vlm
    from vlm import bench, kernels
    from vlm.loader import convert_vision
    from vlm.models.qwen2_vl.processor import ProcessorSettings, preprocess_image
    from vlm.models.qwen2_vl.vision import Qwen2VisionTransformer, VisionConfig

    model = vlm.load("smollm2-135m", threads=threads)
    prefill = [bench.bench_prefill(model, n, reps).median for n in PROMPTS]
    decode = [bench.bench_decode(model, 64, d, reps).median for d in DEPTHS]
    del model

    sys.path.insert(0, str(HERE))
    from bench_qwen2vl_vision import FAMILIES, random_tensors

    config = VisionConfig.from_dict(FAMILIES["qwen2_vl"][0])
    tower = Qwen2VisionTransformer(config, convert_vision(random_tensors(config, np.random.default_rng(0)), "q8"))
    kernels.set_threads(threads)
    settings = ProcessorSettings(min_pixels=3136, max_pixels=12845056)
    vision = []
    for side in IMAGE_SIDES:
        img = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
        p = preprocess_image(img, settings, max_image_tokens=None)
        best = float("inf")
        for _ in range(max(1, reps - 1)):
            t = time.perf_counter()
            out = tower(p.pixels, [p.grid])
            best = min(best, time.perf_counter() - t)
        vision.append({"side": side, "tokens": int(out.shape[0]), "seconds": best})
    return {"threads": threads, "reps": reps, "kernels": kernels.info()["path"],
            "prefill": {"prompt_tokens": PROMPTS, "tok_s": prefill},
            "decode": {"depth": DEPTHS, "tok_s": decode},
            "vision": vision}


def _panel(draw, box, title: str, xlabel: str, xs: list, ys: list, font, log_x: bool = False) -> None:
    """One line chart inside box (left, top, right, bottom); y from 0, x from 0 or log2."""
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 30, right - 25, bottom - 45
    ymax = max(ys) * 1.15
    pos = [math.log2(x) for x in xs] if log_x else list(xs)
    lo, hi = (pos[0] - 0.3, pos[-1] + 0.3) if log_x else (0, max(pos) * 1.05)
    draw.text((left + 60, top + 5), title, fill="black", font=font)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black", width=2)
    for i in range(5):  # y grid and labels
        v = ymax * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((left + 5, y - 6), f"{v:,.0f}" if ymax >= 10 else f"{v:.1f}", fill="black", font=font)
    pts = [(x0 + (x1 - x0) * (x - lo) / (hi - lo), y1 - (y1 - y0) * y / ymax) for x, y in zip(pos, ys, strict=True)]
    draw.line(pts, fill=(31, 119, 180), width=3)
    for (px, py), x in zip(pts, xs, strict=True):
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(31, 119, 180))
        draw.text((px - 12, y1 + 6), f"{x}", fill="black", font=font)
    draw.text((x0 + (x1 - x0) // 2 - 60, bottom - 22), xlabel, fill="black", font=font)


def draw(result: dict, png: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (1500, 450), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    v = result["vision"]
    _panel(d, (0, 0, 500, 430), "Prefill tok/s, SmolLM2-135M Q4_1", "prompt tokens (log scale)",
           result["prefill"]["prompt_tokens"], result["prefill"]["tok_s"], font, log_x=True)
    _panel(d, (500, 0, 1000, 430), "Decode tok/s (64 tokens) at context depth", "tokens already in the cache",
           result["decode"]["depth"], result["decode"]["tok_s"], font)
    _panel(d, (1000, 0, 1500, 430), "Vision encode seconds, Qwen2-VL-2B ViT (q8)", "square image side (px)",
           [e["side"] for e in v], [e["seconds"] for e in v], font)
    d.text((10, 433), f"vlm, {result['threads']} threads, kernels {result['kernels']}; "
           f"median of {result['reps']} (vision: best of {max(1, result['reps'] - 1)})", fill=(90, 90, 90), font=font)
    img.save(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="docs/cost.json")
    ap.add_argument("--png", default="docs/cost.png")
    ap.add_argument("--from-json", help="redraw from a saved JSON instead of measuring")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = measure(args.threads, args.reps)
        Path(args.json).write_text(json.dumps(result, indent=1))
    draw(result, Path(args.png))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
