"""Does pipelining the ViT with the decoder pay (the BlueLM-V-3B idea)? Measure it.

    python scripts/bench_pipelining.py [--threads 2] [--text-tokens 256] [--tiles 5] [--reps 3]

SmolVLM-256M's vision tower (real shapes, random weights) encodes `tiles` 512-px tiles while
SmolLM2-135M (the real decoder of SmolVLM-256M's architecture) prefills `text-tokens` tokens:
once one after the other, once at the same time in two threads (numpy and our kernels release
the GIL). Pipelining pays only if the overlapped time is clearly below the sequential sum.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_smolvlm_vision import SCALE, TEXT_HIDDEN, VISION, random_vision_tensors

    import vlm
    from vlm.bench import _inputs
    from vlm.models.idefics3.vision import Idefics3VisionConfig, Idefics3VisionModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--tiles", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    model = vlm.load(vlm.pull("smollm2-135m"), threads=args.threads)
    weights = random_vision_tensors(TEXT_HIDDEN["256M"])
    vision = Idefics3VisionModel(Idefics3VisionConfig.from_dict(VISION), SCALE, weights)
    tiles = np.random.default_rng(0).normal(size=(args.tiles, 3, 512, 512)).astype(np.float32)
    text = _inputs(model, args.text_tokens)

    def encode() -> None:
        vision(tiles)

    def prefill() -> None:
        model.session.reset()
        model.session.prefill(text)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def overlapped() -> float:
        t = time.perf_counter()
        worker = threading.Thread(target=encode)
        worker.start()
        prefill()
        worker.join()
        return time.perf_counter() - t

    encode(), prefill()  # warm up
    enc = statistics.median(timed(encode) for _ in range(args.reps))
    pre = statistics.median(timed(prefill) for _ in range(args.reps))
    both = statistics.median(overlapped() for _ in range(args.reps))
    print(f"vision {args.tiles} tiles {enc:.2f} s, prefill {args.text_tokens} tok {pre:.2f} s: "
          f"sequential {enc + pre:.2f} s, overlapped {both:.2f} s ({(enc + pre) / both:.2f}x)")


if __name__ == "__main__":
    main()
