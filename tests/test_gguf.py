"""GGUF reader and checkpoint loader, checked against gguf-py (llama.cpp's own Python package).

Small files are written with gguf-py's GGUFWriter; the real SmolLM2 file is used when present,
and transformers' GGUF loader (which dequantizes and un-permutes) when torch is installed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from vlm import kernels
from vlm.errors import VlmError
from vlm.formats.gguf import GGUFFile, load_gguf_checkpoint
from vlm.memory import mapping_of
from vlm.quant import HalfWeight, QuantizedWeight

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


QUANT_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.BF16]


def _write(path: Path, tensors: dict, arch: str = "llama", metadata=None) -> Path:
    """Write a GGUF: tensors maps name -> float array (stored as is) or (float array, ggml type)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, add in (metadata or {}).items():
        add(w, key)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, gguf.quants.quantize(t[0], t[1]), raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- tensors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_quantized_load_matches_gguf_dequantize(tmp_path, qtype, rows):
    a = _rand(rows, 96, seed=rows)
    a[0, :32] = 0.0  # an all-zero block: scale 0
    f = GGUFFile(_write(tmp_path / "q.gguf", {"w": (a, qtype)}))
    assert f.tensors["w"].type_name == qtype.name and f.tensors["w"].shape == (rows, 96)
    w = f.load("w")
    ref = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
    np.testing.assert_array_equal(w.dequantize(), ref)  # bit-exact, not merely close
    if qtype == T.BF16:
        assert isinstance(w, HalfWeight) and w.bf16
        return
    assert isinstance(w, QuantizedWeight) and w.group_size == 32 and w.shape == (rows, 96)
    assert (w.bits, w.symmetric, w.mins is None) == {
        T.Q8_0: (8, True, True),
        T.Q4_0: (4, True, True),
        T.Q4_1: (4, False, False),
    }[qtype]
    # read in place: strided views of the file's blocks, nothing copied
    assert all(mapping_of(a) is not None for a in (w.qweight, w.scales) + ((w.mins,) if w.mins is not None else ()))
    assert w.qweight.shape == (rows, 3, 32 if qtype == T.Q8_0 else 16) and w.scales.dtype == np.float16
    rows_sel = np.array([rows - 1, 0])
    np.testing.assert_array_equal(w.dequantize(rows_sel), ref[rows_sel])
    if kernels.AVAILABLE:  # the kernels repack from the views in place: same matrix as from a copy
        x, mode = _rand(2, 96, seed=9), kernels.info()["mode"]
        kernels.set_mode("float")
        try:
            np.testing.assert_allclose(kernels.linear(x, kernels.prepare(w)), x @ ref.T, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(kernels.unpack_rows(kernels.prepare(w), rows_sel), ref[rows_sel])
        finally:
            kernels.set_mode(mode)


def test_float_tensors_are_views_in_numpy_order(tmp_path):
    a32, a16, a3 = _rand(5, 40), _rand(3, 8, seed=1).astype(np.float16), _rand(2, 3, 4, seed=2)
    big = _rand(520, 512, seed=3)  # over 1 MiB
    f = GGUFFile(_write(tmp_path / "f.gguf", {"f32": a32, "f16": a16, "norm": a32[0], "cube": a3, "big": big}))
    assert [f.tensors[n].shape for n in ("f32", "f16", "norm", "cube")] == [(5, 40), (3, 8), (40,), (2, 3, 4)]
    w = f.load("big")
    assert w.dtype == np.float32 and not w.flags.owndata and not w.flags.writeable  # mmap view, no copy
    np.testing.assert_array_equal(w, big)
    w = f.load("f32")  # small ones are copies: a view would fault its file pages in on every use
    assert w.dtype == np.float32 and w.flags.owndata
    np.testing.assert_array_equal(w, a32)
    np.testing.assert_array_equal(f.load("cube"), a3)
    h = f.load("f16")
    assert isinstance(h, HalfWeight) and not h.bf16 and h.data.dtype == np.float16
    np.testing.assert_array_equal(h.data, a16)


def test_unsupported_tensor_type(tmp_path):
    f = GGUFFile(_write(tmp_path / "tq2.gguf", {"blk.0.w": (_rand(2, 256), T.TQ2_0)}))
    with pytest.raises(VlmError) as e:
        f.load("blk.0.w")
    assert str(e.value) == (
        "unsupported GGUF tensor type TQ2_0 for blk.0.w; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, IQ4_NL, "
        "Q4_K, IQ4_XS, Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K"
    )
    with pytest.raises(VlmError, match="no tensor named"):
        f.load("nope")


def test_metadata_round_trip(tmp_path):
    md = {
        "t.u8": lambda w, k: w.add_uint8(k, 200),
        "t.i8": lambda w, k: w.add_int8(k, -100),
        "t.u16": lambda w, k: w.add_uint16(k, 60000),
        "t.i16": lambda w, k: w.add_int16(k, -30000),
        "t.u32": lambda w, k: w.add_uint32(k, 4_000_000_000),
        "t.i32": lambda w, k: w.add_int32(k, -2_000_000_000),
        "t.u64": lambda w, k: w.add_uint64(k, 2**63 + 5),
        "t.i64": lambda w, k: w.add_int64(k, -(2**62)),
        "t.f32": lambda w, k: w.add_float32(k, 0.1),
        "t.f64": lambda w, k: w.add_float64(k, 0.1),
        "t.bool": lambda w, k: w.add_bool(k, True),
        "t.str": lambda w, k: w.add_string(k, "héllo 日本 👍"),
        "t.strs": lambda w, k: w.add_array(k, ["a", "", "ü b"]),
        "t.ints": lambda w, k: w.add_array(k, [1, -2, 3]),
        "t.floats": lambda w, k: w.add_array(k, [1.5, -2.25]),
        "t.nested": lambda w, k: w.add_array(k, [[1, 2], [3]]),
        "general.alignment": lambda w, k: w.add_uint32(k, 64),
    }
    f = GGUFFile(_write(tmp_path / "m.gguf", {"x": _rand(2, 3)}, metadata=md))
    m = f.metadata
    assert m["general.architecture"] == "llama"
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (200, -100, 60000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (
        4_000_000_000,
        -2_000_000_000,
        2**63 + 5,
        -(2**62),
    )
    assert m["t.f32"] == float(np.float32(0.1)) and m["t.f64"] == 0.1 and m["t.bool"] is True
    assert m["t.str"] == "héllo 日本 👍" and m["t.strs"] == ["a", "", "ü b"]
    assert m["t.ints"].tolist() == [1, -2, 3] and m["t.floats"].tolist() == [1.5, -2.25]
    assert [list(x) for x in m["t.nested"]] == [[1, 2], [3]]
    assert f.alignment == 64 and f.data_offset % 64 == 0 and f.tensors["x"].offset % 64 == 0
    np.testing.assert_array_equal(f.load("x"), _rand(2, 3))


# --- bad files ----------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path) -> Path:
    md = {"t.strs": lambda w, k: w.add_array(k, ["x", "yy"]), "t.f": lambda w, k: w.add_float32(k, 1.0)}
    return _write(tmp_path / "good.gguf", {"a": _rand(3, 64), "b": (_rand(2, 64), T.Q4_1)}, metadata=md)


def _variant(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


def test_missing_and_non_files(tmp_path):
    with pytest.raises(VlmError, match="no such file"):
        GGUFFile(tmp_path / "absent.gguf")
    with pytest.raises(VlmError, match="directory"):
        GGUFFile(tmp_path)
    for data in (b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\x00" * 8):
        with pytest.raises(VlmError, match="not a GGUF"):
            GGUFFile(_variant(tmp_path / "short.gguf", data))
    with pytest.raises(VlmError, match="bad magic"):
        GGUFFile(_variant(tmp_path / "st.gguf", b'{"weight_map": {}}' + b" " * 40))


def test_bad_versions(tmp_path, good_file):
    data = good_file.read_bytes()
    for version, msg in ((1, "unsupported GGUF version 1"), (4, "unsupported GGUF version 4")):
        with pytest.raises(VlmError, match=msg):
            GGUFFile(_variant(tmp_path / "v.gguf", data[:4] + struct.pack("<I", version) + data[8:]))
    with pytest.raises(VlmError, match="big-endian"):
        GGUFFile(_variant(tmp_path / "be.gguf", data[:4] + struct.pack(">I", 3) + data[8:]))


def test_every_truncation_is_a_vlm_error(tmp_path, good_file):
    data = good_file.read_bytes()
    f = GGUFFile(good_file)
    data_end = max(t.offset + t.nbytes for t in f.tensors.values())  # the writer pads after it
    for cut in range(0, f.data_offset + 1):
        with pytest.raises(VlmError) as e:
            GGUFFile(_variant(tmp_path / "cut.gguf", data[:cut]))
        assert "\n" not in str(e.value)
    with pytest.raises(VlmError, match="tensor b data runs past end of file.*truncated"):
        GGUFFile(_variant(tmp_path / "cut.gguf", data[: data_end - 1]))


def test_absurd_counts(tmp_path, good_file):
    data = good_file.read_bytes()
    huge = struct.pack("<Q", 2**62)
    with pytest.raises(VlmError, match="cannot fit"):  # tensor count
        GGUFFile(_variant(tmp_path / "n.gguf", data[:8] + huge + data[16:]))
    with pytest.raises(VlmError, match="cannot fit"):  # metadata count
        GGUFFile(_variant(tmp_path / "n.gguf", data[:16] + huge + data[24:]))
    with pytest.raises(VlmError, match="truncated or corrupt"):  # first key's length
        GGUFFile(_variant(tmp_path / "n.gguf", data[:24] + huge + data[32:]))
    # the string array's element count
    at = data.index(b"t.strs") + len(b"t.strs") + 8
    with pytest.raises(VlmError, match="truncated or corrupt"):
        GGUFFile(_variant(tmp_path / "n.gguf", data[:at] + huge + data[at + 8 :]))


def test_corrupted_headers_only_raise_vlm_errors(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    header_end = GGUFFile(good_file).data_offset
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = bytearray(data)
        for pos in rng.integers(8, header_end, size=3):
            bad[pos] = int(rng.integers(0, 256))
        try:
            f = GGUFFile(_variant(tmp_path / "fz.gguf", bytes(bad)))
            for name in f.tensors:
                f.load(name)
        except VlmError:
            pass


# --- checkpoints --------------------------------------------------------------------------------

H, NH, NKV, HD, FF, V, L = 64, 4, 2, 16, 96, 300, 2
TOKENS = [chr(c) for c in range(33, 33 + V - 5)] + ["!!", "#$", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(arch: str, tied: bool) -> dict[str, np.ndarray]:
    """Random HF-named weights for a tiny llama/qwen2 decoder."""
    s = iter(range(1000))
    w = {"model.embed_tokens.weight": _rand(V, H, seed=next(s)), "model.norm.weight": _rand(H, seed=next(s))}
    if not tied:
        w["lm_head.weight"] = _rand(V, H, seed=next(s))
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = _rand(H, seed=next(s))
        w[p + "post_attention_layernorm.weight"] = _rand(H, seed=next(s))
        for n, rows in (("q", NH * HD), ("k", NKV * HD), ("v", NKV * HD)):
            w[p + f"self_attn.{n}_proj.weight"] = _rand(rows, H, seed=next(s))
            if arch == "qwen2":
                w[p + f"self_attn.{n}_proj.bias"] = _rand(rows, seed=next(s))
        w[p + "self_attn.o_proj.weight"] = _rand(H, NH * HD, seed=next(s))
        w[p + "mlp.gate_proj.weight"] = _rand(FF, H, seed=next(s))
        w[p + "mlp.up_proj.weight"] = _rand(FF, H, seed=next(s))
        w[p + "mlp.down_proj.weight"] = _rand(H, FF, seed=next(s))
    return w


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_checkpoint(path: Path, arch: str, hf: dict, qtype=None, extra_md=None, extra_tensors=None) -> Path:
    """Lay HF weights out as llama.cpp's converter does (names, Llama q/k permutation, quantization)."""
    tensors = dict(extra_tensors or {})
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{_TO_GGUF[mod]}.{kind}"
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            w = _llama_permute(w, NH if ".q_proj." in name else NKV)
        tensors[g] = (w, qtype) if qtype is not None and w.ndim == 2 else w
    md = {
        f"{arch}.block_count": lambda w, k: w.add_uint32(k, L),
        f"{arch}.context_length": lambda w, k: w.add_uint32(k, 256),
        f"{arch}.embedding_length": lambda w, k: w.add_uint32(k, H),
        f"{arch}.feed_forward_length": lambda w, k: w.add_uint32(k, FF),
        f"{arch}.attention.head_count": lambda w, k: w.add_uint32(k, NH),
        f"{arch}.attention.head_count_kv": lambda w, k: w.add_uint32(k, NKV),
        f"{arch}.attention.layer_norm_rms_epsilon": lambda w, k: w.add_float32(k, 1e-6),
        f"{arch}.rope.freq_base": lambda w, k: w.add_float32(k, 1e6),
        "tokenizer.ggml.model": lambda w, k: w.add_string(k, "gpt2"),
        "tokenizer.ggml.pre": lambda w, k: w.add_string(k, "qwen2"),
        "tokenizer.ggml.tokens": lambda w, k: w.add_array(k, TOKENS),
        "tokenizer.ggml.token_type": lambda w, k: w.add_array(k, [1] * (V - 3) + [3, 3, 3]),
        "tokenizer.ggml.merges": lambda w, k: w.add_array(k, ["! !", "# $"]),
        "tokenizer.ggml.bos_token_id": lambda w, k: w.add_uint32(k, V - 2),
        "tokenizer.ggml.eos_token_id": lambda w, k: w.add_uint32(k, V - 1),
        "tokenizer.chat_template": lambda w, k: w.add_string(k, "{{ messages }}"),
        **(extra_md or {}),
    }
    return _write(path, tensors, arch=arch, metadata=md)


def test_llama_checkpoint_f32_unpermutes_q_and_k(tmp_path):
    hf = _hf_weights("llama", tied=True)
    ck = load_gguf_checkpoint(_write_checkpoint(tmp_path / "l.gguf", "llama", hf))
    assert ck.config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": H,
        "intermediate_size": FF,
        "num_hidden_layers": L,
        "num_attention_heads": NH,
        "num_key_value_heads": NKV,
        "head_dim": HD,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 256,
        "vocab_size": V,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
    }
    assert set(ck.tensors) == set(hf)
    for name, w in hf.items():
        np.testing.assert_array_equal(ck.tensors[name], w, err_msg=name)
    assert (ck.bos_token_id, ck.bos_token, ck.eos_token_id, ck.eos_token) == (
        V - 2,
        "<|im_start|>",
        V - 1,
        "<|im_end|>",
    )
    assert ck.pad_token_id is None and ck.chat_template == "{{ messages }}"
    assert ck.add_bos_token is False  # gpt2 vocab, qwen2 pre, no flag: llama.cpp adds none
    assert ck.tokenizer.encode("<|im_start|>!!#$!").ids == [V - 2, V - 5, V - 4, 0]


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_0, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_llama_checkpoint_quantized_unpermutes_rows(tmp_path, qtype):
    hf = _hf_weights("llama", tied=False)
    path = _write_checkpoint(tmp_path / "q.gguf", "llama", hf, qtype=qtype)
    ck = load_gguf_checkpoint(path)
    assert ck.config["tie_word_embeddings"] is False and "lm_head.weight" in ck.tensors
    for name, w in hf.items():
        got = ck.tensors[name]
        if w.ndim == 1:
            assert isinstance(got, np.ndarray) and got.dtype == np.float32
            continue
        # what llama.cpp stored, dequantized by gguf-py, with the permutation undone by the test's inverse
        stored = w
        if ".q_proj." in name or ".k_proj." in name:
            stored = _llama_permute(w, NH if ".q_proj." in name else NKV)
        ref = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
        if ".q_proj." in name or ".k_proj." in name:
            n = NH if ".q_proj." in name else NKV
            ref = ref.reshape(n, HD // 2, 2, H).swapaxes(1, 2).reshape(ref.shape)
        np.testing.assert_array_equal(got.dequantize(), ref, err_msg=name)


def test_qwen2_checkpoint_keeps_rows_and_biases(tmp_path):
    hf = _hf_weights("qwen2", tied=True)
    extra = {
        "qwen2.rope.scaling.type": lambda w, k: w.add_string(k, "yarn"),
        "qwen2.rope.scaling.factor": lambda w, k: w.add_float32(k, 4.0),
        "qwen2.rope.scaling.original_context_length": lambda w, k: w.add_uint32(k, 32768),
        "tokenizer.ggml.add_bos_token": lambda w, k: w.add_bool(k, True),
    }
    ck = load_gguf_checkpoint(_write_checkpoint(tmp_path / "q.gguf", "qwen2", hf, extra_md=extra))
    c = ck.config
    assert (c["model_type"], c["attention_bias"], c["tie_word_embeddings"]) == ("qwen2", True, True)
    assert c["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    assert set(ck.tensors) == set(hf)
    for name, w in hf.items():  # NEOX rotary in Qwen2 files: nothing permuted
        np.testing.assert_array_equal(ck.tensors[name], w, err_msg=name)
    assert ck.add_bos_token is True
    assert ck.tokenizer.encode("!").ids == [V - 2, 0]  # the file asks for BOS
    assert ck.tokenizer.encode("!", add_special_tokens=False).ids == [0]


def test_checkpoint_errors(tmp_path):
    hf = _hf_weights("llama", tied=True)
    with pytest.raises(VlmError, match="unsupported architecture 'gemma'"):
        load_gguf_checkpoint(_write(tmp_path / "g.gguf", {"x": _rand(2, 2)}, arch="gemma"))
    missing = dict(hf)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(VlmError, match=r"lacks tensor blk\.1\.ffn_up\.weight$"):
        load_gguf_checkpoint(_write_checkpoint(tmp_path / "m.gguf", "llama", missing))
    path = _write_checkpoint(
        tmp_path / "r.gguf", "llama", hf, extra_md={"llama.block_count": lambda w, k: w.add_uint32(k, 1)}
    )
    with pytest.raises(VlmError, match=r"unexpected tensor blk\.1\."):
        load_gguf_checkpoint(path)
    path = _write_checkpoint(tmp_path / "f.gguf", "llama", hf, extra_tensors={"rope_freqs.weight": _rand(8)})
    with pytest.raises(VlmError, match="rope_freqs.weight"):
        load_gguf_checkpoint(path)
    bad_md = {"llama.embedding_length": lambda w, k: w.add_string(k, "576")}
    with pytest.raises(VlmError, match="llama.embedding_length is not a number"):
        load_gguf_checkpoint(_write_checkpoint(tmp_path / "s.gguf", "llama", hf, extra_md=bad_md))


# --- the real SmolLM2 file ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_checkpoint(smollm2_gguf):
    return load_gguf_checkpoint(smollm2_gguf)


def test_real_config_and_tensor_kinds(real_checkpoint):
    ck = real_checkpoint
    assert ck.config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "hidden_act": "silu",
    }
    assert len(ck.tensors) == 2 + 30 * 9 and "lm_head.weight" not in ck.tensors
    assert ck.tensors["model.embed_tokens.weight"].kind == "q8"
    assert ck.tensors["model.embed_tokens.weight"].shape == (49152, 576)
    for i in (0, 29):
        p = f"model.layers.{i}."
        assert ck.tensors[p + "self_attn.k_proj.weight"].shape == (192, 576)
        assert ck.tensors[p + "mlp.down_proj.weight"].shape == (576, 1536)
        for n in ("q", "k", "v", "o"):
            assert ck.tensors[p + f"self_attn.{n}_proj.weight"].kind == "q4_asym"
        assert ck.tensors[p + "input_layernorm.weight"].dtype == np.float32
    assert ck.bos_token_id == 1 and ck.eos_token_id == 2 and ck.eos_token == "<|im_end|>"
    assert ck.add_bos_token is False and ck.chat_template.startswith("{% for message in messages %}")


def test_real_tensors_match_gguf_py(smollm2_gguf):
    ours = GGUFFile(smollm2_gguf)
    ref = gguf.GGUFReader(str(smollm2_gguf))
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()
    assert ours.metadata["tokenizer.ggml.merges"][:3] == ["Ġ t", "Ġ a", "i n"]
    by_name = {t.name: t for t in ref.tensors}
    assert set(ours.tensors) == set(by_name)
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_down.weight", "output_norm.weight"):
        t = by_name[name]
        info = ours.tensors[name]
        assert info.type_name == t.tensor_type.name and info.offset == t.data_offset
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        w = ours.load(name)
        want = gguf.quants.dequantize(t.data[:64], t.tensor_type)
        got = w[:64] if isinstance(w, np.ndarray) else w.dequantize(slice(0, 64))
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def hf_state_dict(smollm2_transformers):
    model, _ = smollm2_transformers
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.torch
@pytest.mark.slow
def test_real_weights_equal_transformers(real_checkpoint, hf_state_dict):
    """transformers dequantizes and un-permutes q/k itself: every tensor must agree bit for bit."""
    for name, w in real_checkpoint.tensors.items():
        ours = w if isinstance(w, np.ndarray) else w.dequantize()
        np.testing.assert_array_equal(ours, hf_state_dict[name], err_msg=name)
