"""Mutation testing: put known bugs into a copy of the repository, one at a time, and check that
the tests about each one catch it.

    python scripts/mutate.py [NAME ...] [--list] [--keep]

Each mutation replaces one exact piece of text in one file (it must occur exactly once, so a
mutation that no longer applies is reported, not silently skipped) and names the test files
that should catch it. The working tree, tracked and untracked files with the built extension,
is copied once to a temporary folder; each mutation runs in its own copy of that, and one to a
C file rebuilds the extension there first. Prints a table: mutation | caught? | by which test.
Exit status 1 if any mutation survives.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


F16 = "tests/test_f16_cache.py::"
MUTATIONS = [
    Mutation("f16 rounding truncates (C vlm_float_to_half)", "vlm/kernels/matmul_portable.c",
             "if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;", "(void)rest;",
             (F16 + "test_store_half_rounds_as_numpy", F16 + "test_cache_writes_round_as_numpy")),
    Mutation("f16 subnormals read as zero (C vlm_half_to_float)", "vlm/kernels/matmul_portable.c",
             "float f = (float)man * (1.0f / 16777216.0f);", "float f = 0.0f * (float)man;",
             (F16 + "test_attention_reads_halves_as_numpy_widens_them",)),
    Mutation("f16 row tail not stored (to_half's last partial vector)", "vlm/kernels/attention_impl.h",
             "for (; c < n; c++) y[c] = vlm_float_to_half(x[c]);", "",
             (F16 + "test_store_half_rounds_as_numpy",)),
    Mutation("attention drops the last partial key block", "vlm/kernels/attention_impl.h",
             "const int kend = a->causal ? ops_min(a->t, a->offset + i1) : a->t;",
             "const int kend = (a->causal ? ops_min(a->t, a->offset + i1) : a->t) / KB * KB;",
             ("tests/test_attention.py::test_matches_reference",)),
    Mutation("8-bit activations truncate instead of rounding (W4A8)", "vlm/kernels/matmul_portable.c",
             "const int v = (int)nearbyintf(xb[i] * id);", "const int v = (int)(xb[i] * id);",
             ("tests/test_kernels.py",)),
    Mutation("fused decode step subtracts the q/k/v biases", "vlm/kernels/decode.c",
             "for (int i = 0; i < n; i++) y[i] += b[i];", "for (int i = 0; i < n; i++) y[i] -= b[i];",
             ("tests/test_default_path.py::test_tiny_default_path_matches_transformers",
              F16 + "test_decode_step_reads_the_half_cache_as_numpy")),
    Mutation("Linear subtracts its bias (q/k/v bias sign)", "vlm/models/layers.py",
             "            y += self.bias", "            y -= self.bias",
             ("tests/test_decoder.py::test_logits_and_greedy_match_transformers",)),
    Mutation("rope rotates the other way (sin sign)", "vlm/models/llama.py",
             "(np.sin(emb) * scale).astype(np.float32)", "(-np.sin(emb) * scale).astype(np.float32)",
             ("tests/test_decoder.py::test_logits_and_greedy_match_transformers",)),
    Mutation("numpy rope pairs the halves wrongly (rotate-half parity)", "vlm/models/layers.py",
             "rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
             "rotated = np.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
             ("tests/test_numpy_path.py",)),
    Mutation("M-RoPE decode ignores rope_delta", "vlm/session.py",
             "np.array([pos + s.rope_delta], dtype=np.int64)", "np.array([pos], dtype=np.int64)",
             ("tests/test_default_path.py::test_tiny_default_path_matches_transformers",)),
    Mutation("image digest dropped from the cache keys", "vlm/prompt.py",
             "keys += [(s.image.digest, s.start + j) for j in range(s.rows)]",
             "keys += [(0, s.start + j) for j in range(s.rows)]",
             ("tests/test_prefix_reuse.py::test_a_new_image_in_the_same_place_is_not_taken_from_the_cache",)),
    Mutation("torn-line repair removed (caption resume)", "vlm/caption.py",
             "f.truncate(keep)", "pass",
             ("tests/test_reliability.py::test_resume_cuts_a_torn_last_line",)),
    Mutation("numpy RMSNorm ignores its weight", "vlm/models/layers.py",
             "return x * (1.0 / np.sqrt(var + eps)) * weight", "return x * (1.0 / np.sqrt(var + eps))",
             ("tests/test_numpy_path.py",)),
    Mutation("4-bit dequantize drops the mins (the numpy Linear's weights)", "vlm/quant.py",
             "w = q * scales[..., None] + self.mins[sel].astype(np.float32)[..., None]",
             "w = q * scales[..., None]",
             ("tests/test_gguf.py::test_quantized_load_matches_gguf_dequantize",)),
    Mutation("Llama 3 rope scaling: the ramp reversed", "vlm/models/layers.py",
             "inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)",
             "inv = np.where(mid, smooth * inv / factor + (1 - smooth) * inv, scaled)",
             ("tests/test_rope_scaling.py::test_matches_transformers",)),
    Mutation("YaRN attention factor dropped", "vlm/models/llama.py",
             "self.rope_scale = rope_attention_factor(c.rope_scaling)", "self.rope_scale = 1.0",
             ("tests/test_rope_scaling.py::test_matches_transformers",)),
]


def copy_tree(dst: Path) -> None:
    """The working tree as it is (tracked and untracked, not ignored) plus the built extension
    and the weights folder's files (linked)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    extras = [p.relative_to(ROOT).as_posix() for p in (ROOT / "vlm" / "kernels").glob("_native*.so")]
    for rel in [*filter(None, listed), *extras]:
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for w in (ROOT / "weights").glob("*"):
        if not (dst / "weights" / w.name).exists():
            (dst / "weights").mkdir(exist_ok=True)
            os.symlink(w.resolve(), dst / "weights" / w.name)


def apply(tree: Path, m: Mutation) -> None:
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.name!r}: the text to replace occurs {count} times in {m.file}")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def run_tests(tree: Path, m: Mutation) -> tuple[bool, str, float]:
    """(caught, first failing test or the reason, seconds)."""
    t0 = time.perf_counter()
    if m.file.endswith((".c", ".h")):
        build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q", "-j", "2"], cwd=tree,
                               capture_output=True, text=True)
        if build.returncode:
            return True, "the build fails", time.perf_counter() - t0
    missing = [t for t in m.tests if not (tree / t.split("::")[0]).exists()]
    if missing:
        return False, f"no such test file: {', '.join(missing)}", 0.0
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.setdefault("VLM_WEIGHTS", str(ROOT / "weights"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                          cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 0:
        return False, "-", seconds
    if failed:
        return True, failed[0], seconds
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return True, f"pytest exit {proc.returncode}: {tail[-1] if tail else ''}", seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only mutations whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or any(n.lower() in m.name.lower() for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.file}; {' '.join(m.tests)}]")
        return 0
    work = Path(tempfile.mkdtemp(prefix="vlm-mutate-"))
    base = work / "base"
    copy_tree(base)
    rows = []
    try:
        for i, m in enumerate(chosen):
            tree = work / f"m{i}"
            shutil.copytree(base, tree, symlinks=True)
            apply(tree, m)
            caught, by, seconds = run_tests(tree, m)
            rows.append((m.name, "yes" if caught else "NO", by, f"{seconds:.0f}s"))
            print(f"[{i + 1}/{len(chosen)}] {m.name}: {'caught' if caught else 'SURVIVED'} ({by})", flush=True)
            if not args.keep:
                shutil.rmtree(tree)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| mutation | caught? | by which test | time |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(r[1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
