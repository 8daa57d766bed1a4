"""Aggregate throughput of an OpenAI-compatible server against the number of concurrent clients.

    python scripts/bench_serve.py --model weights/SmolLM2-135M-Instruct.Q4_1.gguf --clients 1,2,4,8
    python scripts/bench_serve.py --server llama-cpp-python --model ... --clients 1,2,4,8

Starts the server as its own process on a free loopback port (vlm: `vlm serve --parallel C`
for C clients; llama-cpp-python: `python -m llama_cpp.server`, which has one sequence), then C
threads of the official `openai` client each send `--requests` greedy chat requests of
`--max-tokens` tokens with different prompts. Reports completion tokens per second of wall
time over all clients (prefill included, as a user sees it) and the mean request latency.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["Tell me about the ocean.", "Explain how a bicycle works.", "Write a short poem about autumn.",
           "What is machine learning?", "Describe a busy market.", "Why do cats purr?",
           "How do airplanes fly?", "Give advice for a first job interview."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: str, clients: int, threads: int, ctx: int, port: int) -> subprocess.Popen:
    if server == "vlm":
        cmd = [sys.executable, "-m", "vlm", "serve", "-m", model, "--parallel", str(clients), "-t", str(threads),
               "-c", str(ctx), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx), "--n_threads",
               str(threads), "--port", str(port), "--host", "127.0.0.1"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(client, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            client.models.list()
            return
        except Exception:  # not up yet (connection refused, or 503 while loading)
            time.sleep(0.5)
    raise SystemExit("the server did not get ready")


def run(args: argparse.Namespace, clients: int) -> dict:
    import openai

    port = free_port()
    proc = start(args.server, args.model, clients, args.threads, args.ctx, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        wait_ready(client, proc)
        ask = lambda i: client.chat.completions.create(  # noqa: E731
            model="m", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=args.max_tokens, temperature=0)
        ask(0)  # warm up
        jobs = range(clients * args.requests)
        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            timed = list(pool.map(lambda i: (time.perf_counter(), ask(i + 1), time.perf_counter()), jobs))
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(30)
    tokens = sum(r.usage.completion_tokens for _, r, _ in timed)
    return {"clients": clients, "tok_s": tokens / wall, "latency_s": sum(b - a for a, _, b in timed) / len(timed),
            "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a GGUF file both servers can load")
    ap.add_argument("--server", choices=["vlm", "llama-cpp-python"], default="vlm")
    ap.add_argument("--clients", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()
    print(f"{args.server}: {args.model}, {args.threads} threads, {args.requests} requests per client of "
          f"{args.max_tokens} tokens\n\n| clients | completion tok/s | mean latency s |\n|---|---|---|")
    for c in args.clients:
        r = run(args, c)
        print(f"| {c} | {r['tok_s']:.1f} | {r['latency_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
