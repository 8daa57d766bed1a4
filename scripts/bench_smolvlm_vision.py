"""Time the SmolVLM vision tower (SigLIP + connector) at the real 256M / 500M shapes, random weights.

    python scripts/bench_smolvlm_vision.py [--threads 2] [--models 256M,500M]
                                           [--precisions f32,bf16,q8] [--skip-torch]

For each model and weight precision of the vision Linear layers (f32: numpy BLAS; bf16: as the
hub checkpoints store them; f16 / q8: `vlm.load(..., vision_quantize=...)`), encode one
512 x 512 tile and five tiles (the split of a typical photo: 2 x 2 + global) with vlm, then
with transformers + torch fp32 on the same weights (unless --skip-torch or torch is missing).
Reports seconds, the RSS before and at its peak during the five-tile run (the process holds
the float32 source weights too) and the max relative difference from transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="256M,500M", help="comma-separated subset of 256M,500M")
    ap.add_argument("--precisions", default="f32,bf16,q8", help="comma-separated subset of f32,bf16,f16,q8")
    ap.add_argument("--skip-torch", action="store_true", help="do not run the transformers baseline")
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    # BLAS reads its thread count when numpy loads it.
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vlm import kernels  # noqa: E402
from vlm.loader import convert_vision  # noqa: E402
from vlm.models.idefics3.vision import Idefics3VisionConfig, Idefics3VisionModel  # noqa: E402
from vlm.quant import HalfWeight  # noqa: E402

# Hub configs of SmolVLM-256M/500M-Instruct: SigLIP base/16 at 512 px, pixel shuffle 4.
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 512, "patch_size": 16}
TEXT_HIDDEN = {"256M": 576, "500M": 960}
SCALE = 4
TILES = (1, 5)


def random_vision_tensors(text_hidden: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Checkpoint-named random weights (std 0.02, norms at 1) for the real vision shapes."""
    rng = np.random.default_rng(seed)
    d, f, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, 0.02, shape).astype(np.float32)

    t = {"embeddings.patch_embedding.weight": normal(d, 3, p, p), "embeddings.patch_embedding.bias": normal(d),
         "embeddings.position_embedding.weight": normal((VISION["image_size"] // p) ** 2, d),
         "post_layernorm.weight": np.ones(d, np.float32), "post_layernorm.bias": np.zeros(d, np.float32),
         "modality_projection.proj.weight": normal(text_hidden, d * SCALE**2)}
    for i in range(VISION["num_hidden_layers"]):
        pre = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[pre + f"self_attn.{name}.weight"], t[pre + f"self_attn.{name}.bias"] = normal(d, d), normal(d)
        t[pre + "mlp.fc1.weight"], t[pre + "mlp.fc1.bias"] = normal(f, d), normal(f)
        t[pre + "mlp.fc2.weight"], t[pre + "mlp.fc2.bias"] = normal(d, f), normal(d)
        for norm in ("layer_norm1", "layer_norm2"):
            t[pre + norm + ".weight"], t[pre + norm + ".bias"] = np.ones(d, np.float32), np.zeros(d, np.float32)
    return t


def at_precision(tensors: dict[str, np.ndarray], precision: str) -> dict:
    """The tensors as the loader would hand them over: bf16 is how the hub checkpoints store them."""
    if precision != "bf16":
        return convert_vision(tensors, precision)
    out = {}
    for name, w in tensors.items():
        if w.ndim == 2:  # round to nearest bf16
            bits = w.view(np.uint32)
            w = HalfWeight(((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16), bf16=True)
        out[name] = w
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """Peak resident memory (MB) while the block runs, sampled from /proc every 2 ms; `start` before it."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            if self._stop.wait(0.002):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def torch_baseline(tensors: dict[str, np.ndarray], text_hidden: int, threads: int, tiles: list[np.ndarray]):
    """transformers' Idefics3 vision model + connector on the same weights: (seconds, output) per input."""
    import torch
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

    torch.set_num_threads(threads)
    config = Idefics3Config(vision_config=VISION, text_config={"model_type": "llama", "hidden_size": text_hidden},
                            scale_factor=SCALE)
    vision = Idefics3VisionTransformer(config.vision_config).eval()
    connector = Idefics3Connector(config).eval()
    vision.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("modality")})
    connector.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("modality")})

    def run(px: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return connector(vision(torch.from_numpy(px)).last_hidden_state).numpy()

    run(tiles[0])  # warm-up
    return [timed(run, px) for px in tiles]


def main() -> None:
    args = ARGS
    kernels.set_threads(args.threads)
    rng = np.random.default_rng(1)
    tiles = [rng.uniform(-1, 1, (n, 3, 512, 512)).astype(np.float32) for n in TILES]
    print(f"{args.threads} threads; kernels: {kernels.info()}")
    ours = {}
    for name in args.models.split(","):
        tensors = random_vision_tensors(TEXT_HIDDEN[name])
        for precision in args.precisions.split(","):
            model = Idefics3VisionModel(Idefics3VisionConfig.from_dict(VISION), SCALE, at_precision(tensors, precision))
            model(tiles[0])  # warm-up: first-touch page faults, thread pools
            runs = [timed(model, tiles[0])]
            with PeakRss() as rss:
                runs.append(timed(model, tiles[1]))
            ours[name, precision] = runs
            print(f"SmolVLM-{name} vlm {precision:4s}: " + ", ".join(
                f"{n} tile{'s' if n > 1 else ''} {sec:5.2f} s" for n, (sec, _) in zip(TILES, runs, strict=True))
                + f"  ({runs[1][0] / TILES[1]:.2f} s/tile); RSS {rss.start:.0f} MB with weights, "
                f"peak {rss.peak:.0f} MB while encoding")
            del model

    if args.skip_torch:
        return
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("torch/transformers not installed: baseline skipped")
        return
    for name in args.models.split(","):
        ref = torch_baseline(random_vision_tensors(TEXT_HIDDEN[name]), TEXT_HIDDEN[name], args.threads, tiles)
        print(f"SmolVLM-{name} transformers fp32: " + ", ".join(
            f"{n} tile{'s' if n > 1 else ''} {sec:5.2f} s" for n, (sec, _) in zip(TILES, ref, strict=True)))
        for precision in args.precisions.split(","):
            runs = ours[name, precision]
            speed = ", ".join(f"{r[0] / o[0]:.2f}x ({n})" for n, r, o in zip(TILES, ref, runs, strict=True))
            rel = max(float(np.abs(o[1] - r[1]).max() / np.abs(r[1]).max()) for r, o in zip(ref, runs, strict=True))
            print(f"  vs vlm {precision:4s}: speed-up {speed}; max rel diff {rel:.1e}")


if __name__ == "__main__":
    main()
