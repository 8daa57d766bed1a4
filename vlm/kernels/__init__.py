"""Native kernels (the C extension `vlm.kernels._native`, built by setup.py) behind a small surface.

`prepare(weight)` repacks a weight once, at load, into the kernels' layout and returns an opaque
handle (None when the kernels don't handle that weight, so the caller keeps numpy);
`linear(x, handle)` then computes x @ W.T for float32 x [..., cols] -> [..., rows];
`linears(x, handles)` the products of one x with up to four matrices at once (x's int8
activations prepared once for all, one job on the thread pool: q/k/v, gate/up).

Handled: `QuantizedWeight` (4-bit asymmetric, symmetric and IQ4_NL codebook, 8-bit symmetric;
groups of 32, 64, 128) and `HalfWeight` (fp16, bf16). Plain float32 matrices stay with numpy's BLAS.

The layers' other hot operations, each the C twin of a numpy reference in vlm.models.layers
(which uses them whenever the extension is loaded):

- `attention(q, k, v, causal_offset)`: scaled dot-product attention, q [h, n, d], k/v
  [h_kv, t, d] (grouped KV heads; any strides with the last axis contiguous, so KV-cache
  views are read in place; d <= MAX_HEAD_DIM) -> [h, n, d]. Causal with offset o: query i
  sees keys 0..o+i; None: every key. Online softmax over key blocks: memory stays flat.
- `rms_norm(x, weight, eps)`, `swiglu(gate, up)` (silu(gate) * up), `rotary(x, cos, sin)`
  (x [h, n, d], cos/sin [n, d], HF rotate-half layout).
- `unpack_rows(handle, ids)`: rows ids of a prepared matrix as float32 [len(ids), cols], equal
  bit for bit to the source weight's `dequantize(ids)` (a tied embedding read from the head).
- `store_half(dst, src)`: dst[...] = src rounded to float16 as numpy's cast rounds, with F16C
  (numpy's cast runs at ~0.4 G values/s, ~8% of a SmolLM2 prefill); dst [a, b, d] with d
  contiguous: a float16 KV cache view. `attention` reads float16 k/v as they are.
- `DecoderPlan(layers, norm, eps, n_heads)`: a Llama / Qwen2 decoder's packed layers, held
  once; `plan.step(x, cos, sin, k_caches, v_caches, slots)` runs one token of each of n
  sequences (x [n, hidden], each row with its own cos/sin, KV cache and slot) through every
  layer and the final norm in one call (see vlm/kernels/decode.c): every matrix is read once
  for all n rows. Each step is the same operations, in the same order, as the layer-by-layer
  path, so with one row the results are bit-identical to it; with n rows each row's are too
  wherever the products take int8 activations (float ones sum in an order that depends on
  the token tile: a few ulp).

Knobs, each also settable from the environment at import:

- path: the instruction-set variant, best the CPU supports by default ("avx512" needs
  AVX-512 F/BW/VL/DQ/VNNI; "avxvnni" needs AVX2/FMA/F16C and AVX-VNNI; "avx2" needs
  AVX2/FMA/F16C; on AArch64 "i8mm" needs the dot-product and 8-bit matrix-multiply
  extensions, "dotprod" the dot product, "neon" Advanced SIMD; "portable" is plain C).
  `set_path(name)`; VLM_KERNEL=portable|avx2|avxvnni|avx512|neon|dotprod|i8mm.
- mode: the activations of quantized matmuls. int8 activations are x rounded per run of 32
  values to d * q (d = max|x| / 127, q int8) on the fly, as llama.cpp does, and multiplied
  with integer dot products; float activations match `QuantizedWeight.dequantize()`-based
  numpy to float rounding.
  "w4a8" (default): int8 activations for 4-bit weights, float for 8-bit ones. 8-bit weights
    are the output head (whose logits are what parity is judged on) and whatever was quantized
    for accuracy; their decode GEMV is bound by memory, so float costs no decode speed.
  "int8": int8 activations for every quantized weight (an 8-bit GEMM is ~3x faster so).
  "float": float activations everywhere.
  `set_mode(name)`; VLM_KERNEL_MODE=w4a8|int8|float.
- threads: a persistent pool, all usable cores by default. `set_threads(n)`.

Loading the extension also sets glibc's heap policy so the MB-sized activations a forward pass
frees are kept for the next chunk instead of being returned to the OS and faulted in again
(see bindings.c).

VLM_NO_KERNELS=1 disables the extension. If it is missing or fails to load, one warning is
issued, AVAILABLE is False and every layer uses the numpy reference path.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from vlm.quant import GROUP_SIZES, HalfWeight, QuantizedWeight

MODES = ("w4a8", "int8", "float")  # the order of bindings.c's enum

_native = None
if os.environ.get("VLM_NO_KERNELS", "0") in ("", "0"):
    try:
        _native = importlib.import_module("vlm.kernels._native")
    except ImportError as e:  # not built, or built for another platform
        warnings.warn(f"vlm: native kernels unavailable ({e}); using numpy", RuntimeWarning, stacklevel=2)
AVAILABLE = _native is not None


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare(weight, int8_activations: bool = False, drop_source_pages: bool = False) -> object | None:
    """Repack `weight` into the kernel's layout; None when no kernel handles it.

    In the default W4A8 mode, 8-bit weights keep float activations (the LM head's logits stay
    exact); `int8_activations=True` lets such a matrix take the ~3x faster int8 GEMM too, as
    the vision towers do. The "float" mode still overrides it for exact-math runs.
    `drop_source_pages=True` says the weight's arrays are views of a read-only file map: their
    resident pages are dropped as they are repacked, so a large matrix is never held twice.
    """
    if not AVAILABLE:
        return None
    if isinstance(weight, QuantizedWeight):
        if weight.group_size not in GROUP_SIZES and not (weight.bits == 8 and weight.group_size == 16):
            return None
        return _native.pack_quant(weight.qweight, weight.scales, weight.mins, weight.kind, weight.group_size,
                                  int8_activations, drop_source_pages)
    if isinstance(weight, HalfWeight) and weight.data.ndim == 2:
        return _native.pack_half(weight.data, weight.kind, drop_source_pages)
    return None


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (after loading, which frees many transient copies)."""
    if AVAILABLE:
        _native.release_free_memory()


def _unavailable(*args) -> np.ndarray:
    raise RuntimeError("no native kernels")


# The C functions themselves (linear runs ~200 times per decoded token): no Python wrappers.
linear = _native.linear if AVAILABLE else _unavailable
linears = _native.linears if AVAILABLE else _unavailable
attention = _native.attention if AVAILABLE else _unavailable
rms_norm = _native.rms_norm if AVAILABLE else _unavailable
swiglu = _native.swiglu if AVAILABLE else _unavailable
rotary = _native.rotary if AVAILABLE else _unavailable
unpack_rows = _native.unpack_rows if AVAILABLE else _unavailable
store_half = _native.store_half if AVAILABLE else _unavailable
DecoderPlan = _native.DecoderPlan if AVAILABLE else None
MAX_HEAD_DIM = _native.MAX_HEAD_DIM if AVAILABLE else 0
# Products of at most this many rows give each row the bits it gets alone (kernels.h): the
# widest decode batch whose sequences match their own steps exactly.
SOLO_TOKENS = _native.SOLO_TOKENS if AVAILABLE else 0


def set_threads(n: int | None) -> None:
    """Threads used by the kernels, the calling thread included (None: all usable cores)."""
    if AVAILABLE:
        _native.set_threads(default_threads() if n is None else int(n))


def paths() -> list[str]:
    """Kernel paths this CPU can run, best first."""
    return _native.supported_paths() if AVAILABLE else []


def set_path(name: str | None) -> None:
    """Force a kernel path (a name from `paths()`, e.g. "portable", "avx2", "dotprod"); None picks the best."""
    if AVAILABLE:
        _native.set_path(paths()[0] if name is None else name)


def set_mode(mode: str) -> None:
    """Activations of quantized matmuls: "w4a8", "int8" or "float" (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if AVAILABLE:
        _native.set_mode(MODES.index(mode))


def info() -> dict:
    """What the kernels run with: available, path, mode, threads, paths the CPU supports."""
    if not AVAILABLE:
        return {"available": False, "path": None, "mode": None, "threads": 1, "paths": []}
    return {
        "available": True,
        "path": _native.get_path(),
        "mode": MODES[_native.get_mode()],
        "threads": _native.get_threads(),
        "paths": paths(),
    }


if AVAILABLE:
    set_threads(None)
    try:
        if os.environ.get("VLM_KERNEL"):
            set_path(os.environ["VLM_KERNEL"])
        if os.environ.get("VLM_KERNEL_MODE"):
            set_mode(os.environ["VLM_KERNEL_MODE"])
    except ValueError as e:
        warnings.warn(f"vlm: ignoring kernel setting from the environment: {e}", RuntimeWarning, stacklevel=2)
