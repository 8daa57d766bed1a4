"""vlm against its peers on SmolLM2-135M-Instruct, in one run, same thread count.

    python scripts/bench_peers.py [--threads 2] [--pp 512] [--tg 128] [--reps 3] [--skip mnn,transformers]
    python scripts/bench_peers.py --types Q4_K_M,Q5_K_M,Q6_K,IQ4_NL,Q8_0 [--gguf SRC.gguf] [--reps 1]

Peers: llama.cpp through llama-cpp-python (the same Q4_1 GGUF), MNN (`pip install MNN`;
its own 4-bit export of the same model in ../shared/peers/mnn-smollm2-135m-q4, skipped when
absent) and transformers + torch fp32 (the GGUF dequantized). Every runtime gets the same
random prompt tokens; decode is greedy for `tg` steps. Prints a markdown table with ratios
to llama.cpp, and the medians as JSON with --json.

--types: vlm against llama.cpp on the --gguf file (default: SmolLM2 Q4_1) re-quantized by llama.cpp
to each of these file types (scripts/quantize_gguf.py, kept in the weights folder's
llama.cpp-quants/): one table row per type.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MNN_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "mnn-smollm2-135m-q4"


def prompt_ids(n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, 30000, size=n).tolist()


def bench_vlm(gguf: Path, threads: int, pp: int, tg: int, reps: int) -> tuple[list[float], list[float]]:
    import vlm
    from vlm import bench

    model = vlm.load(gguf, threads=threads)
    pre = bench.bench_prefill(model, pp, reps)
    dec = bench.bench_decode(model, tg, 0, reps)
    return [pre.median, pre.low, pre.high], [dec.median, dec.low, dec.high]


def _spread(values: list[float]) -> list[float]:
    return [statistics.median(values), min(values), max(values)]


def bench_llama_cpp(gguf: Path, threads: int, pp: int, tg: int, reps: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_batch=pp, n_ubatch=pp, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = prompt_ids(pp)
    pres, decs = [], []
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pres.append(pp / (time.perf_counter() - t))
        llm.reset()
        llm.eval(ids[:1])
        t = time.perf_counter()
        for _ in range(tg):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decs.append(tg / (time.perf_counter() - t))
    return _spread(pres), _spread(decs)


@contextlib.contextmanager
def _quiet_stdout():
    """MNN's response() prints its answer from C++: silence file descriptor 1 meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def bench_mnn(threads: int, pp: int, tg: int, reps: int):
    import MNN.llm as mnn_llm

    llm = mnn_llm.create(str(MNN_DIR / "config.json"))
    llm.set_config(json.dumps({"thread_num": threads, "precision": "low", "memory": "low", "sampler_type": "greedy"}))
    llm.load()
    ids = prompt_ids(pp)
    pres, decs = [], []
    for _ in range(reps):
        llm.reset()
        llm.generate(ids)  # with these ids MNN prefills and stops: the prefill figure
        c = llm.context
        pres.append(c.prompt_len / (c.prefill_us / 1e6))
        # Decode: MNN's own loop on a prompt that makes the model talk (it runs to its token limit).
        llm.reset()
        with _quiet_stdout():
            llm.response("Write a very long story about a dragon who learns to paint.")
        c = llm.context
        decs.append((c.gen_seq_len - 1) / (c.decode_us / 1e6))
    return _spread(pres), _spread(decs)


def bench_transformers(gguf: Path, threads: int, pp: int, tg: int, reps: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(pp)])
    pres, decs = [], []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            hf(ids)
            pres.append(pp / (time.perf_counter() - t))
            t = time.perf_counter()
            hf.generate(ids[:, :1], max_new_tokens=tg, min_new_tokens=tg, do_sample=False)
            decs.append(tg / (time.perf_counter() - t))
    return _spread(pres), _spread(decs)


def bench_types(src: Path, types: list[str], args: argparse.Namespace) -> None:
    """vlm and llama.cpp on `src` re-quantized by llama.cpp to each type: one markdown row per type."""
    from quantize_gguf import quantize

    folder = src.parent / "llama.cpp-quants"
    folder.mkdir(exist_ok=True)
    rows = []
    for kind in types:
        path = quantize(src, folder, kind, args.threads)
        ours = bench_vlm(path, args.threads, args.pp, args.tg, args.reps)
        theirs = bench_llama_cpp(path, args.threads, args.pp, args.tg, args.reps)
        rows.append((kind, ours, theirs))
    print(f"\n{src.name} re-quantized by llama.cpp, {args.threads} threads, pp{args.pp} / tg{args.tg}, "
          f"median of {args.reps}\n")
    print("| file type | vlm prefill tok/s | llama.cpp prefill tok/s | prefill ratio | vlm decode tok/s | "
          "llama.cpp decode tok/s | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind, (pre, dec), (lpre, ldec) in rows:
        print(f"| {kind} | {pre[0]:.0f} | {lpre[0]:.0f} | {pre[0] / lpre[0]:.2f}x | {dec[0]:.1f} | {ldec[0]:.1f} | "
              f"{dec[0] / ldec[0]:.2f}x |")
    if args.json:
        print(json.dumps({k: {"vlm": {"prefill": o[0], "decode": o[1]}, "llama.cpp": {"prefill": t[0], "decode": t[1]}}
                          for k, o, t in rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated peers to skip: llama.cpp,mnn,transformers")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--types", default=None, help="llama.cpp file types to re-quantize --gguf to, e.g. Q4_K_M,IQ4_NL")
    args = ap.parse_args()
    import vlm

    gguf = Path(args.gguf) if args.gguf else vlm.pull("smollm2-135m")
    if args.types:
        bench_types(gguf, args.types.split(","), args)
        return
    skip = set(args.skip.split(","))
    runs = {"vlm": lambda: bench_vlm(gguf, args.threads, args.pp, args.tg, args.reps),
            "llama.cpp (llama-cpp-python)": lambda: bench_llama_cpp(gguf, args.threads, args.pp, args.tg, args.reps),
            "MNN": lambda: bench_mnn(args.threads, args.pp, args.tg, args.reps),
            "transformers fp32": lambda: bench_transformers(gguf, args.threads, args.pp, args.tg, args.reps)}
    keys = {"llama.cpp (llama-cpp-python)": "llama.cpp", "MNN": "mnn", "transformers fp32": "transformers"}
    results = {}
    for name, fn in runs.items():
        if keys.get(name) in skip:
            continue
        if name == "MNN" and not (MNN_DIR / "config.json").is_file():
            print(f"skipping MNN: no model at {MNN_DIR}")
            continue
        try:
            results[name] = fn()
        except ImportError as e:
            print(f"skipping {name}: {e}")
    base = results.get("llama.cpp (llama-cpp-python)")
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, pp{args.pp} / tg{args.tg}, median of {args.reps} "
          "(min..max)\n")
    print("| runtime | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |")
    print("|---|---|---|---|---|")
    for name, (pre, dec) in results.items():
        rp = f"{pre[0] / base[0][0]:.2f}x" if base else "-"
        rd = f"{dec[0] / base[1][0]:.2f}x" if base else "-"
        print(f"| {name} | {pre[0]:.0f} ({pre[1]:.0f}..{pre[2]:.0f}) | {dec[0]:.1f} ({dec[1]:.1f}..{dec[2]:.1f}) "
              f"| {rp} | {rd} |")
    if args.json:
        print(json.dumps({k: {"prefill": v[0], "decode": v[1]} for k, v in results.items()}))


if __name__ == "__main__":
    main()
