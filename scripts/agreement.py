"""Teacher-forced top-1 agreement between vlm, llama.cpp and transformers on SmolLM2-135M.

    python scripts/agreement.py [--gguf weights/SmolLM2-135M-Instruct.Q4_1.gguf] [--tokens 64]

Sequences are chat prompts plus llama.cpp's greedy continuation; each runtime scores the
whole sequence and we count positions where the arg-max next token is the same. llama.cpp
quantizes activations to 8 bits inside its 4-bit matmuls, so near-ties flip: agreement is
below 100% even for identical weights. Needs llama-cpp-python (and torch + transformers for
the transformers rows).

The row "vlm 4-bit, <path> kernels" is the same model on a second kernel path of this CPU: the
same int8 rounding rule, products differing only in float order. Its agreement with the default
row is the noise floor of int8 activations: what two equally exact implementations reach.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "Translate 'good morning' into French and German.",
    "What is 17 times 23? Show your work.",
]


def llama_cpp_model(gguf: Path, threads: int = 2):
    import llama_cpp

    return llama_cpp.Llama(str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, logits_all=True,
                           verbose=False)


def sequences(llm, model, n_tokens: int) -> list[list[int]]:
    """Each prompt (chat-templated by vlm) followed by llama.cpp's greedy continuation."""
    out = []
    for p in PROMPTS:
        ids = model.prepare([{"role": "user", "content": p}]).ids.tolist()
        cont = []
        for t in llm.generate(ids, temp=0.0, reset=True):
            if t == llm.token_eos() or len(cont) >= n_tokens:
                break
            cont.append(t)
        out.append(ids + cont)
    return out


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def transformers_logits(hf, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of positions whose arg-max matches, over all sequences."""
    same = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b, strict=True))
    return same / sum(x.shape[0] for x in a)


def logit_rms(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Root mean square difference of all logits, over all sequences' positions."""
    return float(np.sqrt(np.mean(np.concatenate([((x - y) ** 2).mean(-1) for x, y in zip(a, b, strict=True)]))))


def continuation_agreement(llm, model, n_tokens: int, n_prompts: int = len(PROMPTS)) -> float:
    """Top-1 agreement of `model` with llama.cpp over the positions that predict llama.cpp's greedy
    continuation (from the last prompt token on), prompt by prompt."""
    seqs = sequences(llm, model, n_tokens)[:n_prompts]
    starts = [model.prepare([{"role": "user", "content": p}]).ids.size - 1 for p in PROMPTS[:n_prompts]]
    ours = [model.logits(s)[i:] for s, i in zip(seqs, starts, strict=True)]
    theirs = [llama_cpp_logits(llm, s)[i:] for s, i in zip(seqs, starts, strict=True)]
    return agreement(ours, theirs)


def other_path_logits(model, seqs: list[list[int]]) -> tuple[str, list[np.ndarray]] | None:
    """The logits on the second kernel path this CPU runs (None if it has one path only)."""
    from vlm import kernels

    default, *others = kernels.paths() or [None]
    if not others:
        return None
    kernels.set_path(others[0])
    try:
        return others[0], [model.logits(s) for s in seqs]
    finally:
        kernels.set_path(default)


def main() -> None:
    import vlm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: fetched into weights/)")
    ap.add_argument("--tokens", type=int, default=64, help="continuation length per prompt")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--all-positions", action="store_true",
                    help="count the prompts' positions too (default: only those predicting the continuation)")
    args = ap.parse_args()
    gguf = Path(args.gguf) if args.gguf else vlm.pull("smollm2-135m")
    llm = llama_cpp_model(gguf)
    q4 = vlm.load(gguf)
    f32 = vlm.load(gguf, quantize="f32")
    seqs = sequences(llm, q4, args.tokens)
    starts = [0 if args.all_positions else q4.prepare([{"role": "user", "content": p}]).ids.size - 1 for p in PROMPTS]
    rows = {"llama.cpp": [llama_cpp_logits(llm, s) for s in seqs],
            "vlm 4-bit (default)": [q4.logits(s) for s in seqs],
            "vlm f32": [f32.logits(s) for s in seqs]}
    other = other_path_logits(q4, seqs)
    if other:
        rows[f"vlm 4-bit, {other[0]} kernels"] = other[1]
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        rows["transformers f32"] = [transformers_logits(hf, s) for s in seqs]
    rows = {name: [x[i:] for x, i in zip(logits, starts, strict=True)] for name, logits in rows.items()}
    n = sum(len(x) for x in rows["llama.cpp"])
    print(f"{len(seqs)} sequences, {n} positions; top-1 agreement (teacher forced):")
    names = list(rows)
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for a in names:
        print(f"| {a} | " + " | ".join(f"{agreement(rows[a], rows[b]):.3f}" for b in names) + " |")
    ref = rows["vlm f32"]
    err = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(rows["vlm 4-bit (default)"], ref,
                                                                         strict=True))
    print(f"vlm 4-bit vs vlm f32: max logit error {err:.4f} of the largest logit")
    print("logit RMS difference, all logits of those positions:")
    for a, b in [("vlm 4-bit (default)", "vlm f32"), ("llama.cpp", "vlm f32"), ("vlm 4-bit (default)", "llama.cpp"),
                 *([("vlm 4-bit (default)", f"vlm 4-bit, {other[0]} kernels")] if other else [])]:
        print(f"  {a} vs {b}: {logit_rms(rows[a], rows[b]):.3f}")


if __name__ == "__main__":
    main()
