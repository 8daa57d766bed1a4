"""The `vlm` command as a user runs it: every bad input gives one clear error line, exit 1."""

import json
import subprocess
import sys

import pytest


def run(*args, input=None):
    p = subprocess.run([sys.executable, "-m", "vlm", *map(str, args)], capture_output=True, text=True,
                       input=input, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(code, err, needle):
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vlm: error:"), err
    assert needle in lines[0], err


def test_generate_and_info_on_a_tiny_model(tiny_llm):
    code, out, err = run("generate", "-m", tiny_llm("llama"), "-p", "Hello", "-n", "5", "--json-stats")
    assert code == 0, err
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["prompt_tokens"] > 0 and stats["generated_tokens"] <= 5
    code, out, err = run("info", tiny_llm("qwen2"))
    assert code == 0 and "qwen2" in out and "chat template: True" in out
    assert run("info", "-m", tiny_llm("qwen2")) == (code, out, err)  # -m, as every verb takes it
    assert_one_line_error(*run("info", tiny_llm("qwen2"), "-m", tiny_llm("llama"))[::2], "two models named")


def test_missing_model():
    assert_one_line_error(*run("generate", "-m", "/no/such/model", "-p", "hi")[::2], "model not found")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    assert_one_line_error(*run("generate", "-m", bad, "-p", "hi")[::2], "GGUF")


def test_truncated_gguf(tmp_path, smollm2_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[: 3 << 20])
    code, _, err = run("generate", "-m", cut, "-p", "hi")
    assert_one_line_error(code, err, "trunc")


def test_corrupt_safetensors(tmp_path, tiny_llm):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llm("llama"), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run("generate", "-m", d, "-p", "hi")[::2], "safetensors")


def test_unsupported_architecture(tmp_path, tiny_llm):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_llm("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run("generate", "-m", d, "-p", "hi")[::2], "unsupported architecture 'gpt_neox'")


def test_image_for_a_text_model(tmp_path, tiny_llm):
    img = tmp_path / "notes.txt"
    img.write_text("not an image")
    assert_one_line_error(*run("generate", "-m", tiny_llm("llama"), "-p", "hi", "-i", img)[::2], "vision")


def test_prompt_longer_than_context(tiny_llm):
    code, _, err = run("generate", "-m", tiny_llm("llama"), "--ctx", "32", "-p", "word " * 200)
    assert_one_line_error(code, err, "context holds 32")


@pytest.mark.parametrize("flag,message", [
    (["--top-p", "2"], "invalid sampling setting: top_p must be in (0, 1]"),
    (["--temperature", "-1"], "invalid sampling setting: temperature must be >= 0"),
    (["--min-p", "1"], "invalid sampling setting: min_p must be in [0, 1)"),
    (["-n", "0"], "max_new_tokens must be a whole number >= 1, got 0")])
def test_invalid_sampling(flag, message, tiny_llm):
    code, _, err = run("generate", "-m", tiny_llm("llama"), "-p", "hi", *flag)
    assert_one_line_error(code, err, message)


def test_convert_refuses_to_overwrite_other_files(tmp_path, tiny_llm):
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    assert_one_line_error(*run("convert", tiny_llm("llama"), dst)[::2], "refusing")
    assert (dst / "notes.txt").read_text() == "keep me"


def test_convert_then_run(tmp_path, tiny_llm):
    code, out, err = run("convert", tiny_llm("qwen2"), tmp_path / "q4", "--group-size", "64")
    assert code == 0, err
    assert "smaller" in out and "relative RMS" in out
    code, out, err = run("generate", "-m", tmp_path / "q4", "-p", "Hello", "-n", "3", "-q")
    assert code == 0, err


def test_bench_reports_prefill_decode_vision_and_the_bandwidth_limit(tiny_smolvlm):
    code, out, err = run("bench", "-m", tiny_smolvlm, "-p", "16,32", "-n", "4", "-d", "0,8", "-r", "2",
                         "--image-size", "64x64,200x90", "--json")
    assert code == 0, err
    result = json.loads(out)
    tests = [r["test"] for r in result["rows"]]
    assert tests[:4] == ["pp16", "pp32", "tg4", "tg4@d8"]
    assert [t.split(" (")[0] for t in tests[4:]] == ["vision 64x64", "vision 200x90"]
    assert all(r["median"] > 0 and r["low"] <= r["median"] <= r["high"] and r["reps"] == 2 for r in result["rows"])
    assert result["decode_bytes_per_token"] > 0 and result["bandwidth_gbs"] > 0 and result["decode_limit_tps"] > 0
    code, out, err = run("bench", "-m", tiny_smolvlm, "-p", "8", "-n", "2", "-r", "1", "--parallel", "1,3")
    assert code == 0 and "| pp8 |" in out and "limit" in out
    assert "| tg2 x1 seq |" in out and "| tg2 x3 seq |" in out  # aggregate decode of sequences decoded together


def test_serve_flags_are_checked_before_anything_starts(tmp_path):
    assert_one_line_error(*run("serve", "--parallel", "0")[::2], "--parallel")
    assert_one_line_error(*run("serve", "--media-dir", tmp_path / "missing")[::2], "is not a folder")
    for bad in ("0", "-1", "nan", "inf"):
        assert_one_line_error(*run("serve", "--timeout", bad)[::2], "--timeout")
