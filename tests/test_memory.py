"""Loading holds the weights once: peak memory of a load, measured in a fresh process.

The models are random, shaped so that the weights dwarf everything else a load holds (a tiny
tokenizer, the interpreter's own objects), with a tied embedding a third of the weights as in
SmolLM2: holding it twice, or the file's pages beside the repacked copies, or every GGUF
tensor's de-interleaved copy until the model is built, would each show as 30% or more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlm import kernels

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=12288, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=2048,
             tie_word_embeddings=True, model_type="llama")
LINEARS = (("attn_q", "self_attn.q_proj", 1024, 1024), ("attn_k", "self_attn.k_proj", 512, 1024),
           ("attn_v", "self_attn.v_proj", 512, 1024), ("attn_output", "self_attn.o_proj", 1024, 1024),
           ("ffn_gate", "mlp.gate_proj", 2816, 1024), ("ffn_up", "mlp.up_proj", 2816, 1024),
           ("ffn_down", "mlp.down_proj", 1024, 2816))

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")


def measure(path: Path) -> dict:
    """bench_memory.py's measurement of loading `path`, then a short prefill and decode."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's vlm, whatever is installed
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--child", str(path),
                          "--prompt", "64", "--gen", "4"], capture_output=True, text=True, check=True, timeout=300,
                         env=env)
    return json.loads(out.stdout.splitlines()[-1])


def assert_held_once(m: dict, weights_mib: float) -> None:
    # 10% plus a few MiB of objects a load makes besides the weights (tokenizer, config, tables).
    budget = 1.1 * weights_mib + 6
    assert m["load_peak_mib"] - m["baseline_mib"] < budget, m
    assert m["after_load_mib"] - m["baseline_mib"] < budget, m
    assert m["run_peak_mib"] - m["baseline_mib"] < budget + m["kv_used_mib"] + 8, m  # + activations


@pytest.mark.skipif(not kernels.AVAILABLE, reason="the numpy path keeps weights as stored")
def test_converted_model_is_held_once(tmp_path):

    from vlm.formats.native import write_native
    from vlm.testing.random_decoder import random_decoder_tensors
    from vlm.testing.tiny_llm import make_tokenizer

    make_tokenizer(tmp_path)
    files = {f.name: f.read_text() for f in tmp_path.iterdir()}
    size = write_native(tmp_path, SHAPE, random_decoder_tensors(SHAPE), files, {})
    assert_held_once(measure(tmp_path), size / 2**20)


def _blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random Q8_0 / Q4_1 blocks of a [rows, cols] matrix as the bytes GGUF stores."""
    n = rows * cols // 32
    if kind == "Q8_0":
        b = np.zeros(n, [("d", "<f2"), ("qs", "i1", (32,))])
        b["qs"] = rng.integers(-127, 128, (n, 32))
    else:
        b = np.zeros(n, [("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
        b["m"] = -0.03
        b["qs"] = rng.integers(0, 256, (n, 16))
    b["d"] = 0.004
    return b.view(np.uint8).reshape(rows, -1)


# (embedding type, the linears' types by layer): read in place, or transcoded at load (the embedding
# re-quantized to 8-bit, the linears into 4-bit or 8-bit), one matrix at a time.
GGUF_MIXES = {"in place": ("Q8_0", ("Q4_1",)), "transcoded": ("Q6_K", ("Q4_K", "Q5_0", "Q6_K", "IQ4_NL"))}


def _random_tensor(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    if kind in ("Q8_0", "Q4_1"):
        return _blocks(rng, rows, cols, kind)
    from test_gguf_quants import random_blocks

    return random_blocks(kind, rows, cols, seed=int(rng.integers(1 << 30))).reshape(rows, -1)


def write_random_gguf(path: Path, mix: str) -> Path:
    """A random GGUF model of SHAPE, its matrices of the types GGUF_MIXES[mix] names."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    c = SHAPE
    for key, value in (("block_count", c["num_hidden_layers"]), ("context_length", 2048),
                       ("embedding_length", c["hidden_size"]), ("feed_forward_length", c["intermediate_size"]),
                       ("attention.head_count", c["num_attention_heads"]),
                       ("attention.head_count_kv", c["num_key_value_heads"])):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [chr(i) for i in range(33, 127)] + ["!!"])
    w.add_array("tokenizer.ggml.merges", ["! !"])
    embedding, linears = GGUF_MIXES[mix]
    w.add_tensor("token_embd.weight", _random_tensor(rng, c["vocab_size"], c["hidden_size"], embedding),
                 raw_dtype=gguf.GGMLQuantizationType[embedding])
    w.add_tensor("output_norm.weight", np.ones(c["hidden_size"], np.float32))
    for i in range(c["num_hidden_layers"]):
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(c["hidden_size"], np.float32))
        for name, _, rows, cols in LINEARS:
            kind = linears[i % len(linears)]
            w.add_tensor(f"blk.{i}.{name}.weight", _random_tensor(rng, rows, cols, kind),
                         raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("mix", GGUF_MIXES)
def test_gguf_model_is_held_once(tmp_path, mix):
    if not kernels.AVAILABLE:
        pytest.skip("the numpy path keeps weights as stored")
    from bench_memory import _weights_mib

    path = write_random_gguf(tmp_path / "model.gguf", mix)
    assert_held_once(measure(path), _weights_mib(path))  # as held: transcoded types as transcoded


def test_running_a_gguf_model_touches_none_of_its_file(tmp_path):
    """Norms are copied at load: as views of the map, each forward pass faulted them back in with
    the large folios around them (27 MiB of SmolLM2's Q8_0 file, a fifth of its weights)."""
    if not kernels.AVAILABLE:
        pytest.skip("the numpy path keeps weights as stored")
    import vlm

    path = write_random_gguf(tmp_path / "model.gguf", "in place")
    model = vlm.load(path)
    session = model.new_session()
    logits, _ = session.prefill(model.prepare([5, 6, 7, 8]))
    session.step(int(np.argmax(logits)))
    resident, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":  # a mapping's header line
            mapped = line.endswith(str(path))
        elif mapped and line.startswith("Rss:"):
            resident += int(line.split()[1])
    assert resident == 0, f"{resident} KiB of the GGUF file resident after a forward pass"

