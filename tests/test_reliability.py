"""Hostile and broken inputs (issue #10): every one is a per-item error or one clear VlmError line;
nothing hangs, allocates without bound, prints junk or reaches the terminal raw."""

from __future__ import annotations

import csv
import json
import math
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_mutate import run_mutants
from PIL import Image
from safetensors.numpy import load_file, save_file
from test_image import crafted_dds, huge_png_header

import vlm
from vlm.caption import caption
from vlm.cli import main
from vlm.errors import VlmError
from vlm.formats.gguf import GGUFFile
from vlm.formats.safetensors import read_safetensors

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm", *map(str, args)], capture_output=True, timeout=timeout,
                          cwd=ROOT, **kw)


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("vlm: error:"), err
    assert needle in lines[0], err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- images -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_images")
    good = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(good)
    (root / "evil.png").write_bytes(crafted_dds())
    (root / "huge.png").write_bytes(huge_png_header(14000, 14000))
    return {"good": good, "evil": root / "evil.png", "huge": root / "huge.png"}


@pytest.fixture(scope="module")
def vision_model(tiny_smolvlm):
    return vlm.load(tiny_smolvlm)


def test_images_as_a_bare_string_is_one_image(vision_model, images):
    one = vision_model.prepare("Describe.", images=str(images["good"])).ids
    listed = vision_model.prepare("Describe.", images=[str(images["good"])]).ids
    np.testing.assert_array_equal(one, listed)
    for bad in ([None], [123]):
        with pytest.raises(VlmError, match="an image must be"):
            vision_model.segments("Describe.", images=bad)


def test_generate_with_a_crafted_image_is_one_line(tiny_smolvlm, images):
    p = cli("generate", "-m", tiny_smolvlm, "-p", "hi", "-i", images["evil"], text=True)
    assert_one_line_error(p.returncode, p.stderr, "evil.png")
    p = cli("generate", "-m", tiny_smolvlm, "-p", "hi", "-i", images["huge"], text=True)
    assert_one_line_error(p.returncode, p.stderr, "too large")  # and no DecompressionBomb warning


def test_chat_refuses_a_crafted_image_and_keeps_the_conversation(tiny_smolvlm, images):
    script = f"hello\n/image {images['evil']}\nwhat now?\n/quit\n"
    p = cli("chat", "-m", tiny_smolvlm, "-n", "3", input=script, text=True)
    assert p.returncode == 0, p.stderr
    assert "error: cannot read image" in p.stdout and "Traceback" not in p.stderr
    assert "image attached" not in p.stdout  # not kept attached: the next message goes through
    assert p.stdout.count("decode") == 2, p.stdout  # both messages answered (one stats line each)


def test_chat_api_keeps_the_conversation_after_a_bad_image(vision_model, images):
    chat = vlm.Chat(vision_model, max_new_tokens=2)
    chat.send("hello")
    with pytest.raises(VlmError):
        chat.send("and this?", images=[images["evil"]])
    chat.send("still there?")
    assert [u["content"] for u, _ in chat.turns] == ["hello", "still there?"]


# --- captioning -------------------------------------------------------------------------------------

def test_caption_survives_a_crafted_image(tiny_smolvlm, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(images["good"], folder / "a.png")
    shutil.copy(images["evil"], folder / "evil.png")
    out = tmp_path / "out.jsonl"
    p = cli("caption", folder, "-o", out, "-m", tiny_smolvlm, "-n", "2", "-q", text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"a.png", "evil.png"}
    assert "caption" in records["a.png"] and "NotImplementedError" in records["evil.png"]["error"]


class _CrashingModel:
    """Just enough of a Model for `caption`: its preprocessing raises a bug, not a VlmError."""

    family = object()

    def preprocess(self, path):
        raise RuntimeError("a bug in preprocessing")


def test_caption_worker_exception_reaches_the_main_thread(tmp_path, images):
    outcome = []

    def run():
        try:
            caption(_CrashingModel(), str(images["good"]), tmp_path / "x.jsonl", progress=False)
        except RuntimeError as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "caption hung after its worker thread died"
    assert outcome and "a bug in preprocessing" in str(outcome[0])


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(1)
    paths = []
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / name)
        paths.append(str(root / name))
    return paths


def _records(out: Path) -> list[dict]:
    if out.suffix == ".csv":
        with open(out, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in out.read_text().splitlines()]  # every line must parse


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_cuts_a_torn_last_line(vision_model, three_images, tmp_path, fmt):
    out = tmp_path / f"captions.{fmt}"
    a, b, c = three_images
    caption(vision_model, a, out, max_new_tokens=2, progress=False)
    torn = (f'{{"path": "{b}", "caption": "half a capt' if fmt == "jsonl"
            else f'{b},"a caption cut\nin the middle of its quot')  # a newline inside the quotes
    with open(out, "a") as f:
        f.write(torn)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(three_images) + "\n")
    summary = caption(vision_model, str(listing), out, max_new_tokens=2, progress=False)
    assert summary.done == 2 and summary.skipped == 1  # b (torn) and c captioned again, a kept
    records = _records(out)
    assert sorted(r["path"] for r in records) == [a, b, c]  # one whole record each
    assert all(r["caption"] and "half a capt" not in r["caption"] and "cut" not in r["caption"] for r in records)


def test_an_image_listed_twice_is_captioned_once(vision_model, three_images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{three_images[0]}\n{three_images[0]}\n")
    out = tmp_path / "twice.jsonl"
    assert caption(vision_model, str(listing), out, max_new_tokens=2, progress=False).done == 1
    assert len(_records(out)) == 1


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("where", ["dev_full", "missing_folder", "file_size_limit"])
def test_a_failed_write_is_one_line_and_no_partial_record(tiny_smolvlm, three_images, tmp_path, where):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(three_images) + "\n")
    out = {"dev_full": Path("/dev/full"), "missing_folder": tmp_path / "no" / "such" / "out.jsonl",
           "file_size_limit": tmp_path / "out.jsonl"}[where]
    extra = {"preexec_fn": _limit_file_size(150)} if where == "file_size_limit" else {}
    p = cli("caption", listing, "-o", out, "-m", tiny_smolvlm, "-n", "2", "-q", text=True, **extra)
    assert_one_line_error(p.returncode, p.stderr, "cannot write")
    if where == "file_size_limit":  # the first record fits, the second does not: no partial one kept
        lines = out.read_text().splitlines(keepends=True)
        assert len(lines) == 1 and lines[0].endswith("\n") and json.loads(lines[0])["path"] == three_images[0]


# --- hyperparameters: config.json ---------------------------------------------------------------------

@pytest.mark.parametrize(("change", "needle"), [
    ({"vocab_size": 10**6}, "vocab_size"),
    ({"hidden_act": "relu2"}, "hidden_act"),
    ({"hidden_act": ["silu"]}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"num_hidden_layers": 3}, "layers"),
    ({"head_dim": 10**6}, "q_proj"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": 3}, "key/value heads"),
    ({"num_key_value_heads": 1}, "k_proj"),
    ({"intermediate_size": 100}, "gate_proj"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"model_type": ["llama"]}, "model_type"),
])
def test_bad_config_values(tiny_llm, tmp_path, change, needle):
    d = copy_model(tiny_llm("llama"), tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(VlmError, match=needle):
        vlm.load(d)


# (family, file, the value's path in it, a bad value, what the one error line names)
BAD_VISION_SETTINGS = [
    ("qwen2vl", "config.json", ("vision_config", "depth"), "x", "depth"),
    ("qwen2vl", "config.json", ("vision_config", "hidden_act"), True, "hidden_act"),
    ("qwen2vl", "config.json", ("vision_config", "rope_parameters"), [1], "rope_parameters"),
    ("qwen2vl", "config.json", ("text_config", "rope_parameters"), [16, 24, 24], "rope settings"),
    ("qwen2vl", "config.json", ("image_token_id",), "x", "image_token_id"),
    ("qwen2vl", "config.json", ("text_config", "num_attention_heads"), "silu", "num_attention_heads"),
    ("qwen2vl", "preprocessor_config.json", ("image_mean",), "x", "image_mean"),
    ("qwen2vl", "preprocessor_config.json", ("image_std",), [0.5, 0.5, 0.0], "image_std"),
    ("qwen2vl", "preprocessor_config.json", ("max_pixels",), math.inf, "max_pixels"),
    ("qwen2vl", "preprocessor_config.json", ("resample",), 99, "resample"),
    ("smolvlm", "config.json", ("vision_config", "patch_size"), [16], "patch_size"),
    ("smolvlm", "config.json", ("vision_config", "layer_norm_eps"), "x", "layer_norm_eps"),
    ("smolvlm", "config.json", ("vision_config",), 5, "vision_config"),
    ("smolvlm", "config.json", ("scale_factor",), 2.5, "scale_factor"),
]


@pytest.mark.parametrize(("family", "name", "key", "value", "needle"), BAD_VISION_SETTINGS)
def test_bad_vision_settings(tiny_smolvlm, tiny_qwen2vl, tmp_path, family, name, key, value, needle):
    """A vision checkpoint's settings of the wrong type or range: one VlmError naming the key,
    not a TypeError from a conversion inside the family (found by fuzzing)."""
    d = copy_model(tiny_qwen2vl if family == "qwen2vl" else tiny_smolvlm, tmp_path / "m")
    data = json.loads((d / name).read_text()) if (d / name).is_file() else {}
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    (d / name).write_text(json.dumps(data))
    with pytest.raises(VlmError, match=needle):
        vlm.load(d)


@pytest.mark.parametrize("tensor", ["visual.merger.mlp.0.weight", "visual.blocks.0.mlp.fc2.bias",
                                    "visual.merger.ln_q.bias", "model.vision_model.encoder.layers.0.mlp.fc1.weight",
                                    "model.vision_model.encoder.layers.1.self_attn.q_proj.weight",
                                    "model.vision_model.embeddings.position_embedding.weight"])
def test_vision_tensor_of_a_wrong_width(tiny_qwen2vl, tiny_smolvlm, tmp_path, tensor):
    """A tower matrix, bias or norm one column short fails at load, naming it, not inside a
    product on the first image (a fuzzed mmproj's merger did)."""
    d = copy_model(tiny_qwen2vl if tensor.startswith("visual.") else tiny_smolvlm, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors[tensor] = np.ascontiguousarray(tensors[tensor][..., :-1])
    (d / "model.safetensors").unlink()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(VlmError, match="shape"):
        vlm.load(d)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_json_files_that_are_lists(tiny_llm, tmp_path, name):
    d = copy_model(tiny_llm("llama"), tmp_path / "m")
    (d / name).write_text("[1, 2]")
    with pytest.raises(VlmError, match="JSON object"):
        vlm.load(d)


def test_tokenizer_json_invalid_utf8(tiny_llm, tmp_path):
    d = copy_model(tiny_llm("llama"), tmp_path / "m")
    (d / "tokenizer.json").write_bytes(b'{"version": "\xff\xfe"}')
    with pytest.raises(VlmError, match="tokenizer.json"):
        vlm.load(d)


def test_context_sized_against_memory(tiny_llm):
    with pytest.raises(VlmError, match="KV cache of 1,000,000,000 tokens needs"):
        vlm.load(tiny_llm("llama"), context=10**9)


# --- hyperparameters: GGUF ----------------------------------------------------------------------------

def _patched(src: Path, dst: Path, key: str, fmt: str, value) -> Path:
    """A copy of a GGUF with one scalar metadata value overwritten in place."""
    data = bytearray(src.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4  # past key and type tag
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


GGUF_CASES = {  # name: (key, struct format, value)
    "block_count 0xFFFFFFFF": ("llama.block_count", "<I", 0xFFFFFFFF),
    "block_count 0": ("llama.block_count", "<I", 0),
    "embedding_length 0xFFFFFFFF": ("llama.embedding_length", "<I", 0xFFFFFFFF),
    "embedding_length 0": ("llama.embedding_length", "<I", 0),
    "head_count_kv 0": ("llama.attention.head_count_kv", "<I", 0),
    "head_count_kv 3": ("llama.attention.head_count_kv", "<I", 3),
    "head_count_kv 1 (wrong shape)": ("llama.attention.head_count_kv", "<I", 1),
    "feed_forward_length (wrong shape)": ("llama.feed_forward_length", "<I", 100),
    "eps NaN": ("llama.attention.layer_norm_rms_epsilon", "<f", math.nan),
    "eps negative": ("llama.attention.layer_norm_rms_epsilon", "<f", -1e-5),
    "rope base 0": ("llama.rope.freq_base", "<f", 0.0),
}


def test_bad_gguf_hyperparameters_fail_fast_within_a_memory_limit(tiny_gguf, tmp_path):
    """Each file is loaded in a child under a 1 GiB address-space limit: an error, not an allocation."""
    paths = [_patched(tiny_gguf, tmp_path / f"{i}.gguf", *case) for i, case in enumerate(GGUF_CASES.values())]
    t = time.perf_counter()
    results = run_mutants(paths, ROOT)
    assert dict(zip(GGUF_CASES, [r[0] for r in results], strict=True)) == dict.fromkeys(GGUF_CASES, "vlm_error"), \
        results
    assert time.perf_counter() - t < 60


def test_gguf_arrays_nested_5000_deep(tmp_path):
    key = b"x"
    nested = struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)  # array of array of ... of u32
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + nested
    (tmp_path / "deep.gguf").write_bytes(data)
    with pytest.raises(VlmError, match="nested"):
        GGUFFile(tmp_path / "deep.gguf")


def test_gguf_strings_reach_messages_escaped(tmp_path):
    key = b"\x1b]0;pwned\x07\x1b[2J"  # sets the window title and clears the screen, printed raw
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    data = head + struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, 10**6)  # a string past the end
    (tmp_path / "evil.gguf").write_bytes(data + bytes(64))
    with pytest.raises(VlmError) as e:
        GGUFFile(tmp_path / "evil.gguf")
    assert "\x1b" not in str(e.value) and "\x07" not in str(e.value) and "\\x1b]0;pwned" in str(e.value)


def test_shown_escapes_and_cuts():
    from vlm.errors import shown

    assert shown("a\x1b[2Jb\n\u202e\udcff") == "a\\x1b[2Jb\\n\\u202e\\udcff"
    assert len(shown("x" * 1000)) == 80


def test_info_escapes_file_strings(tiny_llm, tmp_path):
    d = copy_model(tiny_llm("llama"), tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "bos_token": "\x1b]0;title\x07\x1b[2J"}))
    p = cli("info", d, text=True)
    assert p.returncode == 0 and "\x1b" not in p.stdout and "\\x1b]0;title" in p.stdout


# --- safetensors and the converted format ------------------------------------------------------------

@pytest.mark.parametrize(("header", "needle"), [
    ([1, 2], "not a JSON object"),
    ({"w": "F32"}, "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [1]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "shape"),
    ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "dtype"),
])
def test_bad_safetensors_headers(tmp_path, header, needle):
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(VlmError, match=needle):
        read_safetensors(tmp_path / "x.safetensors")


def _edit_converted(src: Path, dst: Path, edit) -> Path:
    d = copy_model(src, dst)
    meta = json.loads((d / "vlm_config.json").read_text())
    (d / "vlm_config.json").write_text(json.dumps(edit(meta)))
    return d


NAME = "model.layers.0.mlp.up_proj.weight"


def _set(**fields):
    def edit(meta):
        meta["tensors"][NAME].update(fields)
        return meta
    return edit


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda meta: [meta], "expected an object"),
    (_set(bits=3), "do not make"),
    (_set(group_size=0), "do not make"),
    (_set(group_size=64), "disagree"),
    (_set(symmetric=[True]), "do not make"),
    (_set(kind="q4_sym"), "do not make"),
])
def test_bad_converted_models(tiny_converted, tmp_path, edit, needle):
    with pytest.raises(VlmError, match=needle):
        vlm.load(_edit_converted(tiny_converted, tmp_path / "m", edit))


def test_converted_scales_of_a_wrong_shape(tiny_converted, tmp_path):
    d = copy_model(tiny_converted, tmp_path / "m")
    arrays = load_file(str(d / "model.safetensors"))
    arrays[NAME + ".scales"] = np.ascontiguousarray(arrays[NAME + ".scales"][:, :1])
    (d / "model.safetensors").unlink()
    save_file(arrays, str(d / "model.safetensors"))
    with pytest.raises(VlmError, match="disagree"):
        vlm.load(d)


# --- templates, API arguments, logits ------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_model(tiny_llm):
    return vlm.load(tiny_llm("llama"))


@pytest.mark.parametrize(("template", "needle"), [
    ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}", "range"),
    ("{% for i in range(50000) %}{{ 'y' * 100 }}{% endfor %}", "characters"),
    ("{{ 'x' * 1000000000 }}", "output cap"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
])
def test_hostile_templates(text_model, template, needle):
    tok = text_model.tokenizer
    saved, tok.chat_template = tok.chat_template, template
    try:
        t = time.perf_counter()
        with pytest.raises(VlmError, match=needle):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
        assert time.perf_counter() - t < 10
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"temperature": "1"}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"top_p": "0.5"}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"stop": [1]}, "stop"),
])
def test_bad_generate_arguments(text_model, kwargs, needle):
    with pytest.raises(VlmError, match=needle):
        text_model.generate("hi", max_new_tokens=2, **kwargs)


def test_stop_none_means_no_stop_strings(text_model):
    assert text_model.generate("hi", max_new_tokens=2, stop=None).stats.generated_tokens >= 1


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": None}],
    [{"role": "user", "content": [{"type": "text", "text": None}]}],
    [{"role": "user", "content": ["text"]}],
    [{"role": None, "content": "hi"}],
])
def test_bad_messages(text_model, messages):
    with pytest.raises(VlmError, match="message"):
        text_model.generate(messages, max_new_tokens=2)


def test_invalid_utf8_text(text_model):
    with pytest.raises(VlmError, match="UTF-8"):
        text_model.generate("caf\udce9", max_new_tokens=2)


def test_nan_weights_give_a_clear_error_not_junk(tiny_llm, tmp_path):
    d = copy_model(tiny_llm("llama"), tmp_path / "m")
    arrays = load_file(str(d / "model.safetensors"))
    arrays["model.norm.weight"][3] = np.nan
    save_file(arrays, str(d / "model.safetensors"))
    model = vlm.load(d)
    with pytest.raises(VlmError, match="NaN/inf logits at token"):
        model.generate("hi", max_new_tokens=3)
    with pytest.raises(VlmError, match="NaN/inf logits at token 0"):
        model.logits("hi")


# --- the command line --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "-c", "0", "-p", "hi"], "context"),
    (["generate", "-c", "1e9", "-p", "hi"], "KV cache"),
    (["generate", "--seed", "-1", "-p", "hi"], "seed"),
    (["generate", "-t", "0", "-p", "hi"], "threads"),
    (["generate", "-t", "-1", "-p", "hi"], "threads"),
    (["generate", "-t", "100000", "-p", "hi"], "threads"),
    (["bench", "-p", "100000"], "prompt sizes"),
    (["bench", "-p", "-5"], "prompt sizes"),
    (["bench", "-p", "8", "-r", "0"], "reps"),
    (["bench", "-p", "8", "-d", "1e9"], "depth"),
])
def test_cli_bad_numbers(tiny_llm, capsys, args, needle):
    code = main([*args, "-m", str(tiny_llm("llama"))])
    assert_one_line_error(code, capsys.readouterr().err, needle)


def test_cli_prompt_with_invalid_utf8(tiny_llm):
    p = subprocess.run([sys.executable, "-m", "vlm", "generate", "-m", str(tiny_llm("llama")), "-p", b"caf\xe9"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert_one_line_error(p.returncode, p.stderr, "UTF-8")
