"""Fuzzing the readers: a few hundred seeded mutants of a GGUF file, a safetensors checkpoint and a
`vlm convert` directory, then of tiny vision checkpoints and llama.cpp text + mmproj pairs
(scripts/fuzz_mutate.py). Each is loaded and run in a child process
under an address-space limit; the only acceptable outcomes are a clean VlmError or a run whose
logits are all finite: no other exception, crash, hang or growth past the memory limit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from fuzz_mutate import GOOD, make_mutants, run_mutants

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = 500
VISION_MUTANTS = 120


def test_mutated_model_files(tiny_gguf, tiny_llm, tiny_converted, tmp_path):
    seeds = {"gguf": tiny_gguf, "hf": tiny_llm("llama"), "vlm": tiny_converted}
    mutants = make_mutants(seeds, tmp_path, MUTANTS, seed=0)
    results = run_mutants(mutants, ROOT)
    bad = [f"{path.name}: {outcome}: {detail}" for path, (outcome, detail) in zip(mutants, results, strict=True)
           if outcome not in GOOD]
    assert not bad, "\n".join(bad)
    counts = Counter(outcome for outcome, _ in results)
    assert counts["vlm_error"] > MUTANTS // 4 and counts["finite_run"] > 0  # both paths were exercised


def test_mutated_vision_checkpoints(tiny_smolvlm, tiny_qwen2vl, llama_cpp_pairs, tmp_path):
    """The same for vision models: their config.json (vision_config), preprocessor_config.json and
    tensors, and mmproj files beside their text GGUF; each mutant also encodes an image."""
    seeds = {"smolvlm": tiny_smolvlm, "qwen2vl": tiny_qwen2vl, "pair-qwen2vl": llama_cpp_pairs["qwen2_vl"][1],
             "pair-idefics3": llama_cpp_pairs["idefics3"][1]}
    mutants = make_mutants(seeds, tmp_path, VISION_MUTANTS, seed=0)
    results = run_mutants(mutants, ROOT)
    bad = [f"{path.parent.name}/{path.name}: {outcome}: {detail}"
           for path, (outcome, detail) in zip(mutants, results, strict=True) if outcome not in GOOD]
    assert not bad, "\n".join(bad)
    counts = Counter(outcome for outcome, _ in results)
    assert counts["vlm_error"] > VISION_MUTANTS // 4 and counts["finite_run"] > 0
