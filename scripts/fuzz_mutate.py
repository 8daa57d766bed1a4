"""Seeded mutants of model files, and a runner that loads each one in a memory-limited subprocess.

Three seeds are mutated here: a tiny GGUF, a tiny Hugging Face safetensors directory and its
`vlm convert` directory (vlm/testing/tiny_llm.py, tiny_gguf.py); tests/test_fuzz.py adds tiny
vision checkpoints and llama.cpp text + mmproj pairs. Mutations aim where a hostile or damaged
file hurts: GGUF header fields (counts, lengths, types, dims, offsets) set to boundary values,
random bytes in the header, NaN/inf in float tensors; JSON values of config.json,
tokenizer_config.json, preprocessor_config.json, vlm_config.json and safetensors headers
replaced by values of the wrong type or size; truncations.

Each mutant is loaded and run (a short generation, with an image for a vision model, then
`logits`) in a child process under an address-space limit. Outcomes:
  vlm_error     a clean one-line VlmError           (good)
  finite_run    ran, every logit finite             (good)
  nonfinite     ran, printed junk from NaN/inf logits
  exception     any other exception (a traceback for the user)
  oom           MemoryError, or killed past the memory limit
  crash         the process died on a signal (segfault...)
  hang          no answer within the time limit
Used by tests/test_fuzz.py and scripts/fuzz_report.py.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GOOD = ("vlm_error", "finite_run")
MEMORY_LIMIT = 1 << 30  # bytes of address space for a child: the tiny models need ~150 MB
MUTANT_TIMEOUT_S = 30.0

_INTS = [0, 1, 2, 3, 7, 31, 0xFF, 0x100, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1]
_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-45, 1e30]
_JSON_VALUES = [None, True, 0, -1, 1, 3, 10**6, 10**12, 2**64, 1.5, -0.0, math.nan, math.inf, "", "x", "silu", "1",
                [], [1, 2], {}, {"a": 1}, "A" * 5000, [[[[[]]]]]]


# --- GGUF: where each header field lies -----------------------------------------------------------

def gguf_fields(data: bytes) -> tuple[list[tuple[int, int, str]], list[int]]:
    """(offset, size, kind) of every count, length, type tag and value in a GGUF header (kind is
    "u32", "u64", "f32" or "str"), and the indices of those that shape the model (hyperparameter
    values, tensor dims, types and offsets). Array elements are left out past the first few."""
    fields: list[tuple[int, int, str]] = []
    shaping: list[int] = []
    pos = 24
    fields += [(8, 8, "u64"), (16, 8, "u64")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(with_field: bool) -> None:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        if with_field:
            fields.append((pos, 8, "u64"))
            fields.append((pos + 8, n, "str"))
        pos += 8 + n

    def scalar(vtype: int, with_field: bool) -> None:
        nonlocal pos
        size = sizes[vtype]
        if with_field:
            fields.append((pos, size, "f32" if vtype == 6 else {1: "u8", 2: "u16", 4: "u32", 8: "u64"}[size]))
        pos += size

    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + n]
        string(True)
        fields.append((pos, 4, "u32"))
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if not key.startswith(b"tokenizer."):  # a hyperparameter: its value is a field that shapes the model
            shaping.append(len(fields))
        if vtype == 8:
            string(True)
        elif vtype == 9:
            (etype,) = struct.unpack_from("<I", data, pos)
            fields += [(pos, 4, "u32"), (pos + 4, 8, "u64")]
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            pos += 12
            for i in range(count):
                string(i < 3) if etype == 8 else scalar(etype, i < 3)
        else:
            scalar(vtype, True)
    for _ in range(n_tensors):
        string(True)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        fields.append((pos, 4, "u32"))
        pos += 4
        shaping.extend(range(len(fields), len(fields) + n_dims + 2))
        fields += [(pos + 8 * d, 8, "u64") for d in range(n_dims)]
        pos += 8 * n_dims
        fields += [(pos, 4, "u32"), (pos + 4, 8, "u64")]
        pos += 12
    return fields, shaping


def _gguf_tensor_data(path: Path) -> list[tuple[int, int]]:
    """(offset, nbytes) of every F32 tensor's data (norm weights: where NaN/inf can be planted)."""
    import gguf  # llama.cpp's reader finds the tensors; the mutants then go to ours

    reader = gguf.GGUFReader(str(path))
    return [(int(t.data_offset), int(t.n_bytes)) for t in reader.tensors if t.tensor_type == 0]


def mutate_gguf(data: bytes, rng: np.random.Generator, fields: tuple[list, list], floats: list) -> bytes:
    out = bytearray(data)
    fields, shaping = fields
    op = rng.integers(0, 10)
    if op < 6:  # a header field set to a boundary value, half the time one that shapes the model
        at, size, kind = fields[rng.choice(shaping) if rng.random() < 0.5 else rng.integers(len(fields))]
        if kind == "str":
            if size:
                out[at + int(rng.integers(size))] = int(rng.choice([0, 0x1B, 0x80, 0xFF, 0x2E]))
        elif kind == "f32":
            out[at:at + 4] = struct.pack("<f", float(rng.choice(_FLOATS)))
        else:
            out[at:at + size] = (int(rng.choice(_INTS)) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
    elif op < 8:  # random bytes anywhere in the header
        end = max(f[0] + f[1] for f in fields)
        for _ in range(int(rng.integers(1, 5))):
            out[int(rng.integers(0, end))] = int(rng.integers(0, 256))
    elif op < 9 and floats:  # NaN/inf in a float tensor
        at, n = floats[rng.integers(len(floats))]
        at += 4 * int(rng.integers(n // 4))
        out[at:at + 4] = struct.pack("<f", float(rng.choice(_FLOATS[:3])))
    else:  # truncated
        del out[int(rng.integers(0, len(out))):]
    return bytes(out)


# --- JSON files -------------------------------------------------------------------------------------

def _paths(value, prefix=()) -> list[tuple]:
    """Every path (key / index tuple) into a JSON value."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list) and len(value) <= 64:
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def mutate_json(value, rng: np.random.Generator):
    """A copy of `value` with one node replaced, deleted or (rarely) the whole made a list."""
    value = json.loads(json.dumps(value))
    if rng.random() < 0.05:
        return [value]
    paths = [p for p in _paths(value) if p]
    if not paths:
        return _JSON_VALUES[rng.integers(len(_JSON_VALUES))]
    path = paths[rng.integers(len(paths))]
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    else:
        parent[path[-1]] = _JSON_VALUES[rng.integers(len(_JSON_VALUES))]
    return value


def _safetensors_header(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:]


def mutate_safetensors(data: bytes, rng: np.random.Generator) -> bytes:
    header, rest = _safetensors_header(data)
    if rng.random() < 0.3:  # plant NaN/inf in a float32 tensor
        name = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"]
        info = header[name[rng.integers(len(name))]]
        begin, end = info["data_offsets"]
        out = bytearray(rest)
        at = begin + 4 * int(rng.integers((end - begin) // 4))
        out[at:at + 4] = struct.pack("<f", float(rng.choice(_FLOATS[:3])))
        rest = bytes(out)
    else:
        header = mutate_json(header, rng)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + rest


def _write_dir(base: Path, dst: Path, changed: dict[str, bytes]) -> None:
    dst.mkdir(parents=True)
    for f in base.iterdir():
        if f.name in changed:
            (dst / f.name).write_bytes(changed[f.name])
        else:
            os.link(f, dst / f.name)  # unchanged files are shared, not copied


# Files of a checkpoint directory a mutant may change (those it has), twice as likely for the first two.
DIR_TARGETS = ("config.json", "model.safetensors", "config.json", "model.safetensors", "tokenizer_config.json",
               "preprocessor_config.json")


def _gguf_mutant(seed: Path, rng: np.random.Generator, cache: dict) -> bytes:
    """One or two mutations of a GGUF file (its fields found once per seed)."""
    if seed not in cache:
        data = seed.read_bytes()
        cache[seed] = data, gguf_fields(data), _gguf_tensor_data(seed)
    data, fields, floats = cache[seed]
    out = data
    for _ in range(int(rng.integers(1, 3))):
        if len(out) < len(data):  # truncated: the fields are no longer where they were
            break
        out = mutate_gguf(out, rng, fields, floats)
    return out


def make_mutants(seeds: dict[str, Path], out: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` mutants, spread over the seeds: a GGUF file ("gguf"), a checkpoint directory (HF or
    `vlm convert`; "vlm" names the latter), or a folder holding a text GGUF and its mmproj (a key
    starting "pair", the mmproj mutated). Each is a path to load."""
    rng = np.random.default_rng(seed)
    cache: dict = {}
    kinds = list(seeds)
    mutants = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        base, dst = seeds[kind], out / f"{i:04d}-{kind}"
        if kind == "gguf":
            dst = dst.with_suffix(".gguf")
            dst.write_bytes(_gguf_mutant(base, rng, cache))
        elif kind.startswith("pair"):
            mmproj = next(base.glob("mmproj*.gguf"))
            _write_dir(base, dst, {mmproj.name: _gguf_mutant(mmproj, rng, cache)})
            dst = next(f for f in dst.glob("*.gguf") if f.name != mmproj.name)
        else:
            config = "vlm_config.json" if kind == "vlm" else "config.json"
            present = [config if t == "config.json" else t for t in DIR_TARGETS]
            target = str(rng.choice([t for t in present if (base / t).is_file()]))
            raw = (base / target).read_bytes()
            if target == "model.safetensors":
                new = mutate_safetensors(raw, rng)
            elif rng.random() < 0.1:
                new = raw[: int(rng.integers(0, len(raw)))]
            else:
                new = json.dumps(mutate_json(json.loads(raw), rng)).encode()
            _write_dir(base, dst, {target: new})
        mutants.append(dst)
    return mutants


# --- running mutants --------------------------------------------------------------------------------

# Runs in the child, with the tree under test first on sys.path; one JSON line per mutant.
_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)  # here, not in preexec_fn: unsafe beside threads
import numpy as np
from PIL import Image
from vlm import load
from vlm.errors import VlmError
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
for i, path in enumerate(sys.argv[2:]):
    print(json.dumps({"start": i}), flush=True)
    try:
        model = load(path, threads=1, context=256)
        if model.family is not None:  # a vision model: its preprocessing and tower run too
            model.generate("Describe", images=[image], max_new_tokens=3)
        model.generate("Hello", max_new_tokens=3)
        logits = model.logits("Hi there")
        outcome = "finite_run" if np.isfinite(logits).all() else "nonfinite"
        detail = ""
    except VlmError as e:
        outcome, detail = "vlm_error", str(e)
    except MemoryError:
        outcome, detail = "oom", "MemoryError"
    except BaseException as e:
        outcome, detail = "exception", f"{type(e).__name__}: {e}"[:300]
    print(json.dumps({"done": i, "outcome": outcome, "detail": detail}), flush=True)
"""


def _lines(proc: subprocess.Popen, q: queue.Queue) -> None:
    for line in proc.stdout:
        q.put(line)
    q.put(None)


def run_mutants(paths: list[Path], tree: Path, timeout_s: float = MUTANT_TIMEOUT_S,
                workers: int = min(2, os.cpu_count() or 1)) -> list[tuple[str, str]]:
    """(outcome, detail) of each mutant, in order, loaded by `workers` children at a time (each
    on one thread) importing vlm from `tree`; every other mutant goes to the next worker."""
    with ThreadPoolExecutor(workers) as pool:
        shards = list(pool.map(lambda k: _run_shard(paths[k::workers], tree, timeout_s), range(workers)))
    results: list[tuple[str, str]] = [("", "")] * len(paths)
    for k, shard in enumerate(shards):
        results[k::workers] = shard
    return results


def _run_shard(paths: list[Path], tree: Path, timeout_s: float) -> list[tuple[str, str]]:
    """A child runs mutants until one crashes or hangs it; the next child starts after that one."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    results: list[tuple[str, str]] = []
    while len(results) < len(paths):
        todo = [str(p) for p in paths[len(results):]]
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(MEMORY_LIMIT), *todo], cwd=tree, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(proc, q), daemon=True).start()
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained, not shown
        started = len(results)
        while True:
            try:
                line = q.get(timeout=timeout_s)
            except queue.Empty:
                proc.kill()
                results.append(("hang", f"no answer in {timeout_s:.0f} s"))
                break
            if line is None:  # the child ended
                code = proc.wait()
                if len(results) < len(paths) and (code != 0 or len(results) == started):
                    kind = "crash" if code < 0 and code != -9 else "oom" if code == -9 else "exception"
                    results.append((kind, f"exit status {code}"))
                break
            msg = json.loads(line)
            if "done" in msg:
                results.append((msg["outcome"], msg["detail"]))
        proc.wait()
    return results


def table(results: list[tuple[str, str]]) -> str:
    """Counts by outcome, as a Markdown table."""
    counts = Counter(outcome for outcome, _ in results)
    kinds = ["vlm_error", "finite_run", "nonfinite", "exception", "oom", "crash", "hang"]
    rows = [f"| {k} | {counts.get(k, 0)} |" for k in kinds]
    return "\n".join(["| outcome | mutants |", "|---|---|", *rows, f"| total | {len(results)} |"])


def make_seeds(out: Path) -> dict[str, Path]:
    """The three seed models, built from scratch (vlm/testing's tiny_llm and tiny_gguf)."""
    from vlm.convert import convert
    from vlm.testing.tiny_gguf import make_tiny_gguf
    from vlm.testing.tiny_llm import make_tiny_llm

    hf = make_tiny_llm(out / "hf", "llama")
    gguf_path = make_tiny_gguf(hf, out / "tiny.gguf")
    convert(str(hf), str(out / "vlm"), bits=4, group_size=32)
    shutil.rmtree(out / "mutants", ignore_errors=True)
    return {"gguf": gguf_path, "hf": hf, "vlm": out / "vlm"}
