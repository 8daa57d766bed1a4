"""GGUF (llama.cpp's model file format, versions 2 and 3): a reader of our own, and a checkpoint loader.

The file is memory-mapped: float tensors come back as views on the map, and the quantized
block formats that `vlm.quant` shares with GGUF (Q8_0, Q4_0, Q4_1, IQ4_NL) are split into its
contiguous arrays without re-quantizing, so a GGUF model computes with exactly the weights
llama.cpp would. The K-quants, Q5_0/Q5_1 and IQ4_XS are transcoded into those formats
(see vlm.formats.gguf_quants).

Layout (all little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
the metadata key/values, one info record per tensor (name, dims fastest-first, ggml type,
offset), padding to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import tokenizers

from vlm.errors import VlmError, shown
from vlm.formats.gguf_quants import TRANSCODED, transcode
from vlm.formats.lazy import LazyTensors
from vlm.formats.tokenizer_gguf import gguf_add_bos, tokenizer_from_gguf
from vlm.memory import release_pages
from vlm.quant import HalfWeight, QuantizedWeight

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays in metadata: real files use 1 level; a crafted one must not recurse deep

# ggml tensor types: id -> (name, values per block, bytes per block). Every known type is listed
# so that any tensor's extent can be checked against the file size, loadable or not.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
_FLOAT_TYPES = ("F32", "F16", "BF16")
_COPIED_BYTES = 1 << 20  # F32 tensors up to this size are loaded as copies (see GGUFFile.load)
SUPPORTED_TYPES = (*_FLOAT_TYPES, "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", *TRANSCODED)

# The interleaved block structs of the quantized types we map onto `QuantizedWeight`.
_BLOCK_DTYPES = {
    "Q8_0": np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
    "Q4_0": np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    "Q4_1": np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
    "IQ4_NL": np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),  # Q4_0's block, the nibbles index a codebook
}

# Metadata value types: id -> struct format of a scalar (None: string, array).
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_SCALARS = {k: np.dtype(v) for k, v in _SCALARS.items()}


def _type_name(ggml_type: int) -> str:
    return GGML_TYPES[ggml_type][0] if ggml_type in GGML_TYPES else f"type {ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file. `shape` is in numpy order (slowest dimension first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None for a type this reader does not know

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)


class _Cursor:
    """Reads little-endian values from the mapped header, turning overruns into one-line VlmErrors."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise VlmError(f"{self.path}: truncated or corrupt GGUF file ({what} runs past end of file)")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise VlmError(f"{self.path}: invalid UTF-8 in {what}") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if depth > _MAX_NESTING:
            raise VlmError(f"{self.path}: corrupt GGUF file (arrays nested over {_MAX_NESTING} deep in {what})")
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY_SCALARS:
                dt = _NUMPY_SCALARS[etype]
                self.need(count * dt.itemsize, what)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr
            # Each string or nested array takes at least 8 bytes: bounds absurd counts before looping.
            self.need(count * 8, what)
            if etype == _STRING:
                return [self.string(what) for _ in range(count)]
            if etype == _ARRAY:
                return [self.value(_ARRAY, what, depth + 1) for _ in range(count)]
            raise VlmError(f"{self.path}: corrupt GGUF file (unknown array element type {etype} in {what})")
        raise VlmError(f"{self.path}: corrupt GGUF file (unknown value type {vtype} in {what})")


class GGUFFile:
    """A memory-mapped GGUF file: `metadata`, `tensors` (infos by name) and `load(name)`.

    Numeric metadata arrays come back as numpy arrays, string arrays as lists of str.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:  # magic + version + two counts
                    raise VlmError(f"{self.path}: not a GGUF file (only {size} bytes)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise VlmError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise VlmError(f"{self.path}: is a directory, not a GGUF file") from None
        except OSError as e:
            raise VlmError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self._data = np.frombuffer(self._map, dtype=np.uint8)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        cur = _Cursor(self._map, self.path)
        if self._map[:4] != _MAGIC:
            raise VlmError(f"{self.path}: not a GGUF file (bad magic {bytes(self._map[:4])!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "header")
        if self.version not in _SUPPORTED_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", self.version))[0] in _SUPPORTED_VERSIONS:
                raise VlmError(f"{self.path}: big-endian GGUF files are not supported")
            raise VlmError(
                f"{self.path}: unsupported GGUF version {self.version} (supported: 2, 3); "
                "re-convert the model with a current llama.cpp"
            )
        n_tensors = cur.scalar("<Q", "header")
        n_kv = cur.scalar("<Q", "header")
        # A key/value takes at least 13 bytes and a tensor info at least 24: reject absurd counts early.
        if n_kv * 13 + n_tensors * 24 > cur.size - cur.pos:
            raise VlmError(
                f"{self.path}: corrupt or truncated GGUF file ({n_tensors} tensors and {n_kv} metadata "
                f"entries cannot fit in {cur.size} bytes)"
            )
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            vtype = cur.scalar("<I", f"metadata {shown(key)}")
            self.metadata[key] = cur.value(vtype, f"metadata {shown(key)}")

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor info #{i}")
            what = f"tensor info {shown(name)}"
            n_dims = cur.scalar("<I", what)
            if n_dims > _MAX_DIMS:
                raise VlmError(f"{self.path}: corrupt GGUF file ({what} has {n_dims} dimensions)")
            dims = [cur.scalar("<Q", what) for _ in range(n_dims)]
            ggml_type = cur.scalar("<I", what)
            offset = cur.scalar("<Q", what)
            infos.append((name, dims, ggml_type, offset))

        self.alignment = self.metadata.get("general.alignment", 32)
        if type(self.alignment) is not int or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise VlmError(f"{self.path}: corrupt GGUF file (general.alignment = {self.alignment!r:.40})")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment

        size = len(self._map)
        for raw_name, dims, ggml_type, offset in infos:
            name = shown(raw_name)  # for messages
            if raw_name in self.tensors:
                raise VlmError(f"{self.path}: corrupt GGUF file (tensor {name} appears twice)")
            n = int(np.prod(dims, dtype=np.float64))  # float: an absurd product must not wrap around
            nbytes = None
            if ggml_type in GGML_TYPES:
                _, block, type_size = GGML_TYPES[ggml_type]
                if dims and dims[0] % block:
                    raise VlmError(
                        f"{self.path}: corrupt GGUF file (tensor {name}: row of {dims[0]} values "
                        f"is not a whole number of {_type_name(ggml_type)} blocks)"
                    )
                nbytes = n // block * type_size
            start = self.data_offset + offset
            end = start + (nbytes or 0)
            if end > size:
                raise VlmError(
                    f"{self.path}: tensor {name} data runs past end of file ({end} > {size} bytes); "
                    "the file is truncated (incomplete download?)"
                )
            self.tensors[raw_name] = TensorInfo(
                raw_name, ggml_type, tuple(int(d) for d in reversed(dims)), start, nbytes
            )

    def check(self, name: str) -> None:
        """VlmError unless `load(name)` can read the tensor's type and shape."""
        info = self.tensors[name]
        kind = info.type_name
        name = shown(name)
        if kind not in SUPPORTED_TYPES:
            raise VlmError(
                f"unsupported GGUF tensor type {kind} for {name}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        if kind not in _FLOAT_TYPES and len(info.shape) != 2:
            raise VlmError(
                f"{self.path}: quantized tensor {name} has shape {info.shape}; only matrices are supported"
            )

    def load(self, name: str) -> np.ndarray | HalfWeight | QuantizedWeight:
        """The tensor as stored, never re-quantized.

        F32 -> float32 array (a read-only view on the map; a copy up to 1 MiB); F16/BF16 -> HalfWeight
        (a view);
        Q8_0/Q4_0/Q4_1/IQ4_NL -> QuantizedWeight with group size 32 whose arrays are strided views of
        the blocks (nothing is copied; the kernels repack from them in place); the other block
        types -> a QuantizedWeight transcoded from them (vlm.formats.gguf_quants).
        """
        info = self.tensors.get(name)
        if info is None:
            raise VlmError(f"{self.path}: no tensor named {name!r}")
        self.check(name)
        kind = info.type_name
        raw = self._data[info.offset : info.offset + info.nbytes]
        if kind == "F32":
            # Small ones (norms, biases) are copied: a view would fault its file pages, and the large
            # folios around them, back in on every forward pass after the load dropped them.
            arr = raw.view(np.float32).reshape(info.shape)
            if raw.nbytes > _COPIED_BYTES:
                return arr
            arr = arr.copy()
            release_pages(raw)
            return arr
        if kind in ("F16", "BF16"):
            return HalfWeight(
                raw.view(np.float16 if kind == "F16" else np.uint16).reshape(info.shape), kind == "BF16"
            )
        _, per_block, size = GGML_TYPES[info.ggml_type]
        return read_blocks(kind, raw.reshape(info.shape[0], info.shape[1] // per_block, size))


def read_blocks(kind: str, blocks: np.ndarray) -> QuantizedWeight:
    """A matrix of `kind` blocks (uint8 [rows, blocks per row, bytes per block]): Q8_0/Q4_0/Q4_1/IQ4_NL
    as strided views of the blocks, the other types transcoded (vlm.formats.gguf_quants)."""
    if kind in TRANSCODED:
        return transcode(kind, blocks)
    b = blocks.view(_BLOCK_DTYPES[kind])[..., 0]
    mins = b["m"] if kind == "Q4_1" else None
    return QuantizedWeight(8 if kind == "Q8_0" else 4, 32, kind != "Q4_1", b["qs"], b["d"], mins,
                           codebook=kind == "IQ4_NL")


# --- checkpoint: a llama.cpp Llama/Qwen2 file seen with Hugging Face names ----------------------------

_ARCHITECTURES = ("llama", "qwen2", "qwen2vl")  # qwen2vl: Qwen2 with M-RoPE (Qwen2-VL's and Qwen2.5-VL's text)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED_PER_LAYER = [f"{k}.weight" for k in _BLOCK_NAMES]


@dataclass
class GGUFCheckpoint:
    """A decoder-only language model read from a GGUF file, in Hugging Face terms.

    `tensors` makes weights as `GGUFFile.load` returns them (1-D ones widened to float32), with
    Llama q/k rows put back into Hugging Face's rotary layout, when they are looked up.
    """

    config: dict[str, Any]
    tensors: Mapping[str, np.ndarray | HalfWeight | QuantizedWeight]
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool  # prepend BOS to a prompt (the tokenizer itself only does so when this is set)
    mapping: mmap.mmap | None = field(repr=False, default=None)  # the file's memory map


def _float32_value(v: Any) -> float:
    """A float32 metadata number as the short decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def _number(md: dict[str, Any], key: str, path: str, default: Any = None) -> int | float:
    """A numeric metadata value; a per-layer array is accepted when all layers agree."""
    v = md.get(key, default)
    if v is None:
        raise VlmError(f"{path}: GGUF metadata lacks {key}")
    if isinstance(v, np.ndarray | list):
        values = set(np.asarray(v).ravel().tolist())
        if len(values) != 1:
            raise VlmError(f"{path}: unsupported GGUF: {key} varies across layers")
        v = values.pop()
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise VlmError(f"{path}: GGUF metadata {key} is not a number ({shown(repr(v), 40)})")
    return v


def _config_from_metadata(md: dict[str, Any], arch: str, tensors: dict[str, TensorInfo], path: str) -> dict:
    def num(key: str, default: Any = None) -> int | float:
        return _number(md, f"{arch}.{key}", path, default)

    def count(key: str, default: Any = None) -> int:
        v = num(key, default)
        if isinstance(v, float) and not v.is_integer():
            raise VlmError(f"{path}: GGUF metadata {arch}.{key} is not a whole number ({v})")
        return int(v)

    hidden = count("embedding_length")
    n_heads = count("attention.head_count")
    if n_heads <= 0:
        raise VlmError(f"{path}: GGUF metadata {arch}.attention.head_count is {n_heads}")
    if "token_embd.weight" not in tensors:
        raise VlmError(f"{path}: GGUF file lacks tensor token_embd.weight")
    config: dict[str, Any] = {
        "model_type": "llama" if arch == "llama" else "qwen2",
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": count("attention.head_count_kv", n_heads),
        "head_dim": count("attention.key_length", hidden // n_heads),
        "rms_norm_eps": _float32_value(num("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(num("rope.freq_base", 10000.0)),
        "max_position_embeddings": count("context_length", 2048),
        # the embedding's rows, not `vocab_size` metadata: it is what the weights index
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
    }
    if arch == "qwen2vl":  # llama.cpp's 4 sections (t, h, w, unused): ours are the first 3
        sections = md.get(f"{arch}.rope.dimension_sections")
        if not isinstance(sections, np.ndarray) or sections.size < 3:
            raise VlmError(f"{path}: GGUF metadata lacks {arch}.rope.dimension_sections")
        config["mrope_section"] = [int(n) for n in sections[:3]]
    scaling = md.get(f"{arch}.rope.scaling.type")
    linear = md.get(f"{arch}.rope.scale_linear")  # all that older files wrote
    if scaling is None and linear is not None:
        scaling = "linear"
    if scaling not in (None, "none"):
        factor = num("rope.scaling.factor", linear if linear is not None else 1.0)
        config["rope_scaling"] = {"rope_type": shown(scaling), "factor": _float32_value(factor)}
        if f"{arch}.rope.scaling.original_context_length" in md:
            orig = count("rope.scaling.original_context_length")
            config["rope_scaling"]["original_max_position_embeddings"] = orig
    return config


def _unpermute_rows(w: Any, n_head: int, name: str) -> Any:
    """Undo llama.cpp's q/k row permutation (adjacent-pair rotary -> Hugging Face's rotate-half)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise VlmError(f"cannot un-permute {name}: {rows} rows do not split into {n_head} heads")
    # llama.cpp stored HF row (head, half, i) at (head, i, half); gather them back.
    perm = np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)
    if isinstance(w, np.ndarray):
        return w[perm]
    if isinstance(w, HalfWeight):
        return HalfWeight(w.data[perm], w.bf16)
    return replace(w, qweight=w.qweight[perm], scales=w.scales[perm], mins=None if w.mins is None else w.mins[perm])


def _hf_name(name: str, n_layers: int, path: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES and int(m.group(1)) < n_layers:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    if name == "rope_freqs.weight":
        raise VlmError(f"{path}: Llama-3-style rope frequency factors (rope_freqs.weight) are not supported")
    raise VlmError(f"{path}: unexpected tensor {shown(name)} in a GGUF decoder")


def load_gguf_checkpoint(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a Llama or Qwen2 GGUF file: HF-style config, HF-named weights, tokenizer and chat template."""
    f = GGUFFile(path)
    md = f.metadata
    arch = md.get("general.architecture")
    if arch == "clip":
        raise VlmError(f"{f.path} is a vision projector (mmproj), not a model: load its text GGUF and "
                       "pass this file as its mmproj (-m TEXT.gguf --mmproj MMPROJ.gguf)")
    if arch not in _ARCHITECTURES:
        raise VlmError(
            f"{f.path}: unsupported architecture {shown(repr(arch))} (supported: {', '.join(_ARCHITECTURES)})"
        )
    config = _config_from_metadata(md, arch, f.tensors, f.path)
    n_layers = config["num_hidden_layers"]
    # Bounded by the tensors present before anything is listed per layer (block_count 0xFFFFFFFF).
    present = {m.group(1) for n in f.tensors if (m := _BLOCK_RE.fullmatch(n))}
    if not 0 < n_layers <= len(present):
        raise VlmError(f"{f.path}: GGUF metadata says {n_layers} layers but the file holds tensors for {len(present)}")

    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in f.tensors]
    missing += [
        f"blk.{i}.{s}"
        for i in range(n_layers)
        for s in _REQUIRED_PER_LAYER
        if f"blk.{i}.{s}" not in f.tensors
    ]
    if missing:
        raise VlmError(
            f"{f.path}: GGUF file lacks tensor {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )

    def load(name: str, hf: str) -> Any:
        w = f.load(name)
        if len(w.shape) == 1 and not isinstance(w, np.ndarray):
            w = w.dequantize()  # norms and biases: always float32
        if arch == "llama" and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
            n_head = config["num_attention_heads"] if ".q_proj." in hf else config["num_key_value_heads"]
            w = _unpermute_rows(w, n_head, name)
        return w

    loaders, shapes = {}, {}
    for name in f.tensors:
        f.check(name)  # fail now, not halfway through building the model
        hf = _hf_name(name, n_layers, f.path)
        loaders[hf] = functools.partial(load, name, hf)
        shapes[hf] = f.tensors[name].shape

    tokens = md.get("tokenizer.ggml.tokens") or []

    def special(key: str) -> tuple[int | None, str | None]:
        tid = md.get(f"tokenizer.ggml.{key}")
        if type(tid) is not int or not 0 <= tid < len(tokens):
            return None, None
        return tid, tokens[tid]

    bos_id, bos = special("bos_token_id")
    eos_id, eos = special("eos_token_id")
    pad_id, pad = special("padding_token_id")
    checkpoint = GGUFCheckpoint(
        config=config,
        tensors=LazyTensors(loaders, shapes),
        tokenizer=tokenizer_from_gguf(md),
        chat_template=template if isinstance(template := md.get("tokenizer.chat_template"), str) else None,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        add_bos_token=gguf_add_bos(md),
        mapping=f._map,
    )
    # The loaders keep `f` alive until the model is built, but not its vocabulary lists (~10 MB
    # for 50k tokens): the tokenizer now holds them in its own form.
    f.metadata = {k: v for k, v in md.items() if not k.startswith("tokenizer.ggml.")}
    return checkpoint
