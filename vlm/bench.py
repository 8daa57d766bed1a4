"""`vlm bench`: llama-bench-style measurements of the real request path.

pp N   prefill of an N-token prompt (tok/s)
tg N   N greedy decode steps after a 1-token prompt, or after `depth` tokens of context
tg N xB  N steps of B sequences decoded together in batched steps (aggregate tok/s, --parallel)
vision encode time per image size, for vision-language models
Each test runs `reps` times; we report the median and the spread (min..max), peak memory,
the bytes a decode step reads and the memory-bandwidth limit they imply.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from vlm.errors import VlmError
from vlm.generation import peak_memory_mb
from vlm.runtime import Model
from vlm.session import PromptInputs, step_together


@dataclass
class BenchRow:
    test: str  # "pp512", "tg128", "tg128@d1024", "vision 448x448"
    unit: str  # "tok/s" or "s"
    median: float
    low: float
    high: float
    reps: int


def _inputs(model: Model, n: int, seed: int = 0) -> PromptInputs:
    rng = np.random.default_rng(seed)
    return PromptInputs.from_ids(rng.integers(100, min(model.decoder.config.vocab_size, 30000), size=n))


def _measure(fn, reps: int) -> list[float]:
    return [fn() for _ in range(reps)]


def bench_prefill(model: Model, n: int, reps: int) -> BenchRow:
    inputs = _inputs(model, n)

    session = model.session

    def once() -> float:
        session.reset()
        t = time.perf_counter()
        session.prefill(inputs)
        return n / (time.perf_counter() - t)

    return _row(f"pp{n}", "tok/s", _measure(once, reps))


def bench_decode(model: Model, n: int, depth: int, reps: int) -> BenchRow:
    inputs = _inputs(model, max(depth, 1), seed=1)

    session = model.session

    def once() -> float:
        session.reset()
        logits, _ = session.prefill(inputs)
        t = time.perf_counter()
        for _ in range(n):
            logits = session.step(int(np.argmax(logits)))
        return n / (time.perf_counter() - t)

    return _row(f"tg{n}" + (f"@d{depth}" if depth else ""), "tok/s", _measure(once, reps))


def bench_parallel(model: Model, sequences: int, n: int, reps: int) -> BenchRow:
    """Aggregate decode tok/s of `sequences` sequences decoded together: each in its own
    session, one batched step per token for all of them (as `vlm serve --parallel` runs)."""
    sessions = [model.new_session() for _ in range(sequences)]
    prompts = [_inputs(model, 1, seed=1 + i) for i in range(sequences)]

    def once() -> float:
        logits = []
        for session, inputs in zip(sessions, prompts, strict=True):
            session.reset()
            logits.append(session.prefill(inputs)[0])
        t = time.perf_counter()
        for _ in range(n):
            logits = step_together(sessions, np.argmax(logits, axis=-1).tolist())
        return sequences * n / (time.perf_counter() - t)

    return _row(f"tg{n} x{sequences} seq", "tok/s", _measure(once, reps))


def bench_vision(model: Model, width: int, height: int, reps: int) -> BenchRow:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    from vlm.image import load_image

    processed = model.family.preprocess(load_image(image))

    def once() -> float:
        t = time.perf_counter()
        model.family.encode([processed])
        return time.perf_counter() - t

    return _row(f"vision {width}x{height} ({processed.rows} tok)", "s", _measure(once, reps))


def _row(test: str, unit: str, values: list[float]) -> BenchRow:
    return BenchRow(test, unit, statistics.median(values), min(values), max(values), len(values))


def decode_bytes_per_token(model: Model, depth: int = 0) -> int:
    """Bytes one decode step must read: every decoder weight, one embedding row, the KV cache so far."""
    d = model.decoder
    total = sum(lin.nbytes for layer in d.layers for lin in layer.linears())
    total += d.lm_head.nbytes + d.embed_tokens.nbytes // d.config.vocab_size
    c = d.config
    total += 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.cache.k.itemsize * depth
    return total


def memory_bandwidth_gbs(threads: int = 2, mib: int = 512) -> float:
    """Read bandwidth of this machine: `threads` threads each streaming a disjoint part of a large
    array through BLAS's dot product (faster than np.sum: it measures memory, not the adder)."""
    a = np.ones(mib << 18, dtype=np.float32)
    parts = np.array_split(a, threads)

    def read(x: np.ndarray) -> float:
        return float(np.dot(x, x))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, parts))  # touch once
        best = 0.0
        for _ in range(10):  # the best run: other processes on a shared machine only slow it down
            t = time.perf_counter()
            list(pool.map(read, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def check_settings(model: Model, pp: list[int], tg: list[int], depths: list[int],
                   images: list[tuple[int, int]], reps: int) -> None:
    """VlmError unless every test fits the model's context (and memory) and runs at least once."""
    ctx = model.context
    if not isinstance(reps, int) or reps < 1:
        raise VlmError(f"reps must be >= 1, got {reps}")
    if any(not 1 <= n < ctx for n in pp):
        raise VlmError(f"prompt sizes must be from 1 to {ctx - 1} (the context is {ctx}; load with -c to change it)")
    if any(n < 1 for n in tg) or any(d < 0 for d in depths):
        raise VlmError("decode lengths must be >= 1 and depths >= 0")
    if any(max(d, 1) + n > ctx for n in tg for d in depths):
        raise VlmError(f"depth + decode length must fit the context of {ctx} tokens")
    if model.family is not None and any(len(s) != 2 or not all(1 <= v <= 16384 for v in s) for s in images):
        raise VlmError("image sizes must be WIDTHxHEIGHT, each from 1 to 16384")


def run(model: Model, pp: list[int], tg: list[int], depths: list[int], images: list[tuple[int, int]],
        reps: int, threads: int, parallel: list[int] = ()) -> dict:
    """Every test asked for; `parallel`: numbers of sequences decoded together (aggregate tok/s)."""
    check_settings(model, pp, tg, depths, images, reps)
    if any(b < 1 for b in parallel):
        raise VlmError("the numbers of parallel sequences must be >= 1")
    rows = [bench_prefill(model, n, reps) for n in pp]
    rows += [bench_decode(model, n, d, reps) for n in tg for d in depths]
    rows += [bench_parallel(model, b, n, reps) for n in tg for b in parallel]
    if model.family is not None:
        rows += [bench_vision(model, w, h, reps) for w, h in images]
    peak = peak_memory_mb()  # before the bandwidth probe allocates its own array
    per_token = decode_bytes_per_token(model)
    bandwidth = memory_bandwidth_gbs(threads)
    return {"model": model.info, "threads": threads, "rows": [asdict(r) for r in rows],
            "decode_bytes_per_token": per_token, "bandwidth_gbs": bandwidth,
            "decode_limit_tps": bandwidth * 1e9 / per_token, "peak_memory_mb": peak}


def to_markdown(result: dict) -> str:
    lines = [f"model: {result['model'].get('path')}  threads: {result['threads']}", "",
             "| test | median | min | max | unit | reps |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["test"], f"{r['median']:.2f}", f"{r['low']:.2f}", f"{r['high']:.2f}", r["unit"], str(r["reps"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"decode reads {result['decode_bytes_per_token'] / 1e6:.1f} MB per token; measured bandwidth "
              f"{result['bandwidth_gbs']:.1f} GB/s -> limit {result['decode_limit_tps']:.0f} tok/s; "
              f"peak memory {result['peak_memory_mb']:.0f} MiB"]
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1)
