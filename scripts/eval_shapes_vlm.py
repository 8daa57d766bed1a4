"""Held-out accuracy of `smolvlm-shapes` through vlm's default path (4-bit decoder as the GGUF
holds it, f16 KV cache), and how often vlm's greedy answers equal transformers' in f32.

    python scripts/eval_shapes_vlm.py [--per-task 100] [--parity 25] [--model smolvlm-shapes]

The scenes come from vlm.testing.shapes with a seed training never used; the table goes to
docs/smolvlm-shapes.md. --parity needs torch and transformers.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import vlm
from vlm.testing.shapes import TARGETS, TASKS, accuracy, held_out_questions
from vlm.testing.smolvlm_shapes import ask, transformers_agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smolvlm-shapes")
    ap.add_argument("--per-task", type=int, default=100)
    ap.add_argument("--parity", type=int, default=25, help="held-out scenes per task for the f32 comparison (0: skip)")
    args = ap.parse_args()
    model = vlm.load(args.model)
    t0 = time.time()
    acc = accuracy(lambda image, q: ask(model, image, q), args.per_task)
    print(f"held-out accuracy, default path, {args.per_task} scenes per task ({time.time() - t0:.0f} s):")
    print("| task | target | accuracy |\n|---|---|---|")
    for task in TASKS:
        met = "met" if acc[task] >= TARGETS[task] else "NOT met"
        print(f"| {task} | >= {TARGETS[task]:.0%} | {acc[task]:.0%} ({met}) |")
    if args.parity:
        with tempfile.TemporaryDirectory() as tmp:
            same, total = transformers_agreement(vlm.load(args.model, quantize="f32"),
                                                 held_out_questions(args.parity), tmp)
        print(f"| vlm f32 greedy answers equal to transformers f32 | {same}/{total} = {same / total:.0%} |")


if __name__ == "__main__":
    main()
