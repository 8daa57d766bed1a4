"""Benchmark the Qwen2-VL or Qwen2.5-VL vision tower at real shapes, ours vs transformers.

Qwen2-VL-2B: depth 32, width 1280, 16 heads, merger to 1536. Qwen2.5-VL-3B (--family qwen2_5_vl):
depth 32, width 1280, 16 heads, gated MLP 3420, merger to 2048, windows of 112 px with full
attention in blocks 7, 15, 23, 31 (with --depth d, the first d blocks: those among them).
Random float32 weights (no download). With torch
present both implementations share the very same weights (numpy views of the torch parameters),
so the output difference is reported as well. Peak RSS is the process's high-water mark during
each encode (reset before it), i.e. all weights loaded (both models') plus that run's activations.

    python scripts/bench_qwen2vl_vision.py                       # 448x448 and 768x1536, 2 threads
    python scripts/bench_qwen2vl_vision.py --sizes 448x448 --no-torch
    python scripts/bench_qwen2vl_vision.py --batch              # all sizes in one batched call too
    python scripts/bench_qwen2vl_vision.py --precision f32,q8   # also 8-bit vision weights (mixed precision)
    python scripts/bench_qwen2vl_vision.py --threads 1 --depth 8  # quick; CPU seconds robust to a busy machine
    python scripts/bench_qwen2vl_vision.py --family qwen2_5_vl --sizes 448x448 --precision f32,q8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_memory import reset_peak, status_mib

# Per family: the checkpoint's vision_config, transformers' (config, tower) classes, ours.
FAMILIES = {
    "qwen2_vl": ({"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536,
                  "hidden_act": "quick_gelu", "in_channels": 3, "patch_size": 14, "temporal_patch_size": 2,
                  "spatial_merge_size": 2},
                 ("transformers.models.qwen2_vl", "Qwen2VLConfig", "Qwen2VisionTransformerPretrainedModel"),
                 ("vlm.models.qwen2_vl.vision", "VisionConfig", "Qwen2VisionTransformer")),
    "qwen2_5_vl": ({"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                    "out_hidden_size": 2048, "hidden_act": "silu", "in_channels": 3, "patch_size": 14,
                    "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31]},
                   ("transformers.models.qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VisionTransformerPretrainedModel"),
                   ("vlm.models.qwen2_5_vl.vision", "VisionConfig", "Qwen2_5_VisionTransformer")),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_vl")
    ap.add_argument("--sizes", default="448x448,768x1536", help="comma-separated WIDTHxHEIGHT list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=32, help="fewer blocks for a quick estimate (time scales linearly)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers + torch reference")
    ap.add_argument("--batch", action="store_true", help="also encode all sizes in one batched call")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per size (the best is reported)")
    ap.add_argument("--precision", default="f32",
                    help="comma-separated vision weight precisions to time: f32, f16, q8 (as `vlm.load` applies them)")
    return ap.parse_args()


def _set_threads(n: int) -> None:
    # Must happen before numpy / torch load their BLAS.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def _peak_rss_mb() -> float:
    """The process's peak resident memory since reset_peak(), where Linux tells it."""
    try:
        return status_mib("VmHWM")
    except OSError:
        from vlm.generation import peak_memory_mb

        return peak_memory_mb()


def main() -> None:
    args = parse_args()
    _set_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import importlib

    import numpy as np
    from PIL import Image

    from vlm import kernels
    from vlm.loader import convert_vision
    from vlm.models.qwen2_vl.processor import ProcessorSettings, preprocess_image

    family_config, (ref_module, ref_config_class, ref_class), (our_module, config_class, tower_class) = \
        FAMILIES[args.family]
    VisionConfig = getattr(importlib.import_module(our_module), config_class)
    Tower = getattr(importlib.import_module(our_module), tower_class)

    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch not installed: measuring ours only")
    vision_config = {**family_config, "depth": args.depth}
    config = VisionConfig.from_dict(vision_config)

    t0 = time.perf_counter()
    if torch is not None:
        import transformers

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ref_config = getattr(transformers, ref_config_class)(vision_config=vision_config).vision_config
        ref = getattr(importlib.import_module(f"{ref_module}.modeling_{args.family}"), ref_class)(ref_config).eval()
        tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}  # shared, not copied
    else:
        tensors = random_tensors(config, np.random.default_rng(0))
    kernels.set_threads(args.threads)
    towers = {}
    for precision in args.precision.split(","):
        weights = tensors if precision == "f32" else convert_vision(tensors, precision)
        towers[precision] = Tower(config, weights)
    print(f"weights ready in {time.perf_counter() - t0:.1f}s ({sum(v.nbytes for v in tensors.values()) / 2**20:.0f} MB "
          f"fp32); threads {args.threads}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}; "
          f"kernels {kernels.info()['path']}")

    # The checkpoints' limits (the same in both families) and no token cap: each size is encoded as given.
    settings = ProcessorSettings(min_pixels=3136, max_pixels=12845056)
    rng = np.random.default_rng(0)
    images = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append((size, preprocess_image(img, settings, max_image_tokens=None)))

    runs = [(size, [p]) for size, p in images]
    if args.batch and len(images) > 1:
        runs.append(("+".join(s for s, _ in images) + " batched", [p for _, p in images]))
    print(f"{'image':>24} {'weights':>7} {'patches':>8} {'tokens':>7} {'ours s':>8} {'cpu s':>8} {'ours MB':>8} "
          f"{'hf s':>8} {'cpu s':>8} {'hf MB':>8} {'speedup':>8} {'max rel diff':>12}")
    for label, batch in runs:
        pixels = np.concatenate([p.pixels for p in batch])
        grids = [p.grid for p in batch]
        hf = None
        if torch is not None:
            with torch.no_grad():
                hf_s, hf_cpu, hf_mb, ref_out = _timed(ref, args.repeat, torch.from_numpy(pixels),
                                                      grid_thw=torch.tensor(grids))
            hf = hf_s, hf_cpu, hf_mb, ref_out.pooler_output.numpy()
        for precision, tower in towers.items():
            ours_s, ours_cpu, ours_mb, out = _timed(tower, args.repeat, pixels, grids)
            cells = [f"{label:>24}", f"{precision:>7}", f"{pixels.shape[0]:>8}", f"{out.shape[0]:>7}",
                     f"{ours_s:>8.2f}", f"{ours_cpu:>8.2f}", f"{ours_mb:>8.0f}"]
            if hf is not None:
                hf_s, hf_cpu, hf_mb, ref_out = hf
                diff = float(np.abs(out - ref_out).max() / np.abs(ref_out).max())
                cells += [f"{hf_s:>8.2f}", f"{hf_cpu:>8.2f}", f"{hf_mb:>8.0f}", f"{hf_s / ours_s:>7.2f}x",
                          f"{diff:>12.1e}"]
            print(" ".join(cells), flush=True)


def _timed(fn, repeat: int, *args, **kwargs):
    """(best wall s, its process CPU s, peak RSS MB during the runs, result) of fn(*args, **kwargs).

    CPU seconds are the robust figure on a shared machine at --threads 1: waiting for the core
    inflates wall time but not CPU time.
    """
    best, best_cpu, out = float("inf"), 0.0, None
    reset_peak()
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, _peak_rss_mb(), out


def random_tensors(config, rng) -> dict:
    """Checkpoint-named float32 weights ~N(0, 0.02), norms at 1 (Qwen2.5-VL: RMSNorm, gated MLP)."""
    import numpy as np

    gated = hasattr(config, "window_size")  # Qwen2.5-VL's config
    d = config.embed_dim
    f = config.intermediate_size if gated else int(d * config.mlp_ratio)
    merged = d * config.spatial_merge_size ** 2

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def norm(name: str) -> dict:
        bias = {} if gated else {name + ".bias": np.zeros(d, np.float32)}
        return {name + ".weight": np.ones(d, np.float32), **bias}

    def linear(name: str, rows: int, cols: int) -> dict:
        return {name + ".weight": normal(rows, cols), name + ".bias": normal(rows)}

    t = {"patch_embed.proj.weight": normal(d, config.patch_dim)}
    mlp = (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)) if gated else (("fc1", f, d), ("fc2", d, f))
    for i in range(config.depth):
        p = f"blocks.{i}."
        t.update({**norm(p + "norm1"), **norm(p + "norm2"), **linear(p + "attn.qkv", 3 * d, d),
                  **linear(p + "attn.proj", d, d)})
        for name, rows, cols in mlp:
            t.update(linear(p + "mlp." + name, rows, cols))
    t.update({**norm("merger.ln_q"), **linear("merger.mlp.0", merged, merged),
              **linear("merger.mlp.2", config.hidden_size, merged)})
    return t


if __name__ == "__main__":
    main()
