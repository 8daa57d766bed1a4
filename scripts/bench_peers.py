"""vlm against its peers on SmolLM2-135M-Instruct, in one run, same thread count.

    python scripts/bench_peers.py [--threads 2] [--pp 512] [--tg 128] [--reps 3] [--skip mnn,transformers]
    python scripts/bench_peers.py --types Q4_K_M,Q5_K_M,Q6_K,IQ4_NL,Q8_0 [--gguf SRC.gguf] [--reps 1]

Peers: llama.cpp through llama-cpp-python (the same Q4_1 GGUF), MNN (`pip install MNN`;
its own 4-bit export of the same model in ../shared/peers/mnn-smollm2-135m-q4, skipped when
absent) and transformers + torch fp32 (the GGUF dequantized). Every runtime gets the same
random prompt tokens; decode is greedy for `tg` steps. The runtimes take turns within each
repetition (the machines are shared: a slow spell then slows every runtime of that rep), and a
ratio is the median of the reps' ratios. Prints a markdown table with ratios to llama.cpp, and
the medians as JSON with --json.

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
from collections.abc import Callable
from pathlib import Path

import numpy as np

MNN_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "mnn-smollm2-135m-q4"


def prompt_ids(n: int) -> list[int]:
    return np.random.default_rng(0).integers(100, 30000, size=n).tolist()


# A runtime under test: (prefill once, decode once), each returning tok/s.
Runner = tuple[Callable[[], float], Callable[[], float]]


def vlm_runner(gguf: Path, threads: int, pp: int, tg: int) -> Runner:
    import vlm
    from vlm import bench

    model = vlm.load(gguf, threads=threads)
    return lambda: bench.bench_prefill(model, pp, 1).median, lambda: bench.bench_decode(model, tg, 0, 1).median


def llama_cpp_runner(gguf: Path, threads: int, pp: int, tg: int) -> Runner:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_batch=pp, n_ubatch=pp, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ids = prompt_ids(pp)

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        return pp / (time.perf_counter() - t)

    def decode() -> float:
        llm.reset()
        llm.eval(ids[:1])
        t = time.perf_counter()
        for _ in range(tg):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return tg / (time.perf_counter() - t)

    return prefill, decode


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


def mnn_runner(gguf: Path, threads: int, pp: int, tg: int) -> Runner:
    import MNN.llm as mnn_llm

    llm = mnn_llm.create(str(MNN_DIR / "config.json"))
    llm.set_config(json.dumps({"thread_num": threads, "precision": "low", "memory": "low", "sampler_type": "greedy"}))
    llm.load()
    ids = prompt_ids(pp)

    def prefill() -> float:
        llm.reset()
        llm.generate(ids)  # with these ids MNN prefills and stops: the prefill figure
        return llm.context.prompt_len / (llm.context.prefill_us / 1e6)

    def decode() -> float:  # MNN's own loop on a prompt that makes the model talk (to its token limit)
        llm.reset()
        with _quiet_stdout():
            llm.response("Write a very long story about a dragon who learns to paint.")
        return (llm.context.gen_seq_len - 1) / (llm.context.decode_us / 1e6)

    return prefill, decode


def transformers_runner(gguf: Path, threads: int, pp: int, tg: int) -> Runner:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(pp)])

    @torch.no_grad()
    def prefill() -> float:
        t = time.perf_counter()
        hf(ids)
        return pp / (time.perf_counter() - t)

    @torch.no_grad()
    def decode() -> float:
        t = time.perf_counter()
        hf.generate(ids[:, :1], max_new_tokens=tg, min_new_tokens=tg, do_sample=False)
        return tg / (time.perf_counter() - t)

    return prefill, decode


def interleaved(runners: dict[str, Runner], reps: int) -> dict[str, list[list[float]]]:
    """[prefill tok/s per rep, decode tok/s per rep] per runtime. Each rep runs every runtime's
    prefill back to back, then every decode: a slow spell of the shared machine hits all of
    them alike, and a rep's ratios compare like with like. One untimed round first."""
    out = {name: [[], []] for name in runners}
    for rep in range(reps + 1):
        for phase in (0, 1):
            for name, fns in runners.items():
                value = fns[phase]()
                if rep:
                    out[name][phase].append(value)
    return out


def ratio(ours: list[float], theirs: list[float]) -> float:
    """The median of the per-rep ratios."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def bench_types(src: Path, types: list[str], args: argparse.Namespace) -> None:
    """vlm and llama.cpp on `src` re-quantized by llama.cpp to each type: one markdown row per type."""
    from quantize_gguf import quantize

    folder = src.parent / "llama.cpp-quants"
    folder.mkdir(exist_ok=True)
    rows = []
    for kind in types:
        path = quantize(src, folder, kind, args.threads)
        got = interleaved({name: make(path, args.threads, args.pp, args.tg)
                           for name, make in (("vlm", vlm_runner), ("llama.cpp", llama_cpp_runner))}, args.reps)
        rows.append((kind, got["vlm"], got["llama.cpp"]))
    print(f"\n{src.name} re-quantized by llama.cpp, {args.threads} threads, pp{args.pp} / tg{args.tg}, median of "
          f"{args.reps} reps, vlm and llama.cpp alternating; ratio: the median of the reps' ratios\n")
    print("| file type | vlm prefill tok/s | llama.cpp prefill tok/s | prefill ratio | vlm decode tok/s | "
          "llama.cpp decode tok/s | decode ratio |")
    print("|---|---|---|---|---|---|---|")
    med = statistics.median
    for kind, (pre, dec), (lpre, ldec) in rows:
        print(f"| {kind} | {med(pre):.0f} | {med(lpre):.0f} | {ratio(pre, lpre):.2f}x | {med(dec):.1f} | "
              f"{med(ldec):.1f} | {ratio(dec, ldec):.2f}x |")
    if args.json:
        print(json.dumps({k: {name: {"prefill": med(r[0]), "decode": med(r[1])}
                              for name, r in (("vlm", o), ("llama.cpp", t))} for k, o, t in rows}))


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
    makers = {"vlm": vlm_runner, "llama.cpp (llama-cpp-python)": llama_cpp_runner, "MNN": mnn_runner,
              "transformers fp32": transformers_runner}
    keys = {"llama.cpp (llama-cpp-python)": "llama.cpp", "MNN": "mnn", "transformers fp32": "transformers"}
    runners = {}
    for name, make in makers.items():
        if keys.get(name) in skip:
            continue
        if name == "MNN" and not (MNN_DIR / "config.json").is_file():
            print(f"skipping MNN: no model at {MNN_DIR}")
            continue
        try:
            runners[name] = make(gguf, args.threads, args.pp, args.tg)
        except ImportError as e:
            print(f"skipping {name}: {e}")
    results = interleaved(runners, args.reps)
    base = results.get("llama.cpp (llama-cpp-python)")
    print(f"\nSmolLM2-135M-Instruct, {args.threads} threads, pp{args.pp} / tg{args.tg}, median of {args.reps} reps "
          "(min..max), the runtimes alternating; ratios: the median of the reps' ratios\n")
    print("| runtime | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp |")
    print("|---|---|---|---|---|")
    for name, (pre, dec) in results.items():
        rp = f"{ratio(pre, base[0]):.2f}x" if base else "-"
        rd = f"{ratio(dec, base[1]):.2f}x" if base else "-"
        print(f"| {name} | {statistics.median(pre):.0f} ({min(pre):.0f}..{max(pre):.0f}) | "
              f"{statistics.median(dec):.1f} ({min(dec):.1f}..{max(dec):.1f}) | {rp} | {rd} |")
    if args.json:
        print(json.dumps({k: {"prefill": statistics.median(v[0]), "decode": statistics.median(v[1])}
                          for k, v in results.items()}))


if __name__ == "__main__":
    main()
