"""llama.cpp's VLM file pairs (text GGUF + mmproj), converted by llama.cpp's own converter from
the tiny HF checkpoints, against those directories; the pairing rules; and the other pair: a
Hugging Face directory whose decoder is a GGUF (`vlm_text_gguf`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_ref import image, rel_error
from test_cli import assert_one_line_error, run

import vlm
from vlm.errors import VlmError

PROMPT = "Describe the picture."
IMAGE = image(3, (200, 150))  # several Idefics3 tiles, uneven Qwen2.5-VL windows


def pair_files(folder):
    text = next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))
    return text, next(folder.glob("mmproj*.gguf"))


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "qwen2_5_vl"])
def test_pair_equals_the_hf_directory(llama_cpp_pairs, family):
    """f32 text GGUF + mmproj (paired automatically: the only mmproj in the folder): the same prompt
    ids, logits within 1e-4 of the HF directory's, the same greedy reply."""
    hf_dir, folder = llama_cpp_pairs[family]
    text, mmproj = pair_files(folder)
    want = vlm.load(hf_dir, quantize="f32")
    got = vlm.load(text, quantize="f32")
    assert got.info["mmproj"] == str(mmproj) and got.info["architecture"] == family
    a, b = want.prepare(PROMPT, images=[IMAGE]), got.prepare(PROMPT, images=[IMAGE])
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.positions, b.positions)
    err = rel_error(got.new_session().prefill(b)[0], want.new_session().prefill(a)[0])
    print(f"{family}: logits rel err {err:.2e}")
    assert err <= 1e-4
    options = dict(images=[IMAGE], max_new_tokens=8)
    assert got.generate(PROMPT, **options).tokens == want.generate(PROMPT, **options).tokens


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_f16_and_q8_mmproj(llama_cpp_pairs, family):
    """llama.cpp's f16 and Q8_0 mmproj files (qkv joined from half or 8-bit parts) encode an image
    within those precisions' tolerance of the f32 file."""
    def embeddings(model):
        return model.family.encode([model.preprocess(IMAGE)])[0]

    text, mmproj = pair_files(llama_cpp_pairs[family][1])
    want = embeddings(vlm.load(text, mmproj=mmproj))
    for kind, tol in (("f16", 2e-3), ("q8_0", 3e-2)):
        got = vlm.load(text, mmproj=next(llama_cpp_pairs[f"{family}-{kind}"][1].glob("mmproj*.gguf")))
        err = rel_error(embeddings(got), want)
        print(f"{family} {kind} mmproj: embeddings rel err {err:.2e}")
        assert err <= tol


@pytest.fixture
def qwen_pair(llama_cpp_pairs, tmp_path):
    """A copy of the Qwen2-VL pair's folder: (text GGUF, mmproj)."""
    text, mmproj = pair_files(llama_cpp_pairs["qwen2_vl"][1])
    for f in (text, mmproj):
        shutil.copy(f, tmp_path)
    return tmp_path / text.name, tmp_path / mmproj.name


def test_pairing_rules(qwen_pair, llama_cpp_pairs, tiny_gguf, smollm2_gguf):
    text, mmproj = qwen_pair
    assert vlm.load(text.parent).info["mmproj"] == str(mmproj)  # the folder: its one text GGUF, paired
    second = mmproj.with_name("mmproj-other.gguf")
    shutil.copy(mmproj, second)
    with pytest.raises(VlmError, match="several vision projectors.*mmproj-other.gguf.*--mmproj"):
        vlm.load(text)
    assert vlm.load(text, mmproj=second).info["mmproj"] == str(second)
    with pytest.raises(VlmError, match="is a vision projector .mmproj., not a model"):
        vlm.load(mmproj)
    with pytest.raises(VlmError, match="pairs with a GGUF text model"):
        vlm.load(llama_cpp_pairs["qwen2_vl"][0], mmproj=mmproj)
    # the projector of another architecture, or of another width
    with pytest.raises(VlmError, match="projector qwen2vl_merger. pairs with a qwen2vl text model; tiny.gguf is llama"):
        vlm.load(tiny_gguf, mmproj=mmproj)
    _, smol_mmproj = pair_files(llama_cpp_pairs["idefics3"][1])
    with pytest.raises(VlmError, match="projector idefics3. pairs with a llama text model"):
        vlm.load(text, mmproj=smol_mmproj)
    with pytest.raises(VlmError, match="gives 64-wide image rows but the decoder of .* is 576 wide"):
        vlm.load(smollm2_gguf, mmproj=smol_mmproj)
    truncated = mmproj.with_name("mmproj-truncated.gguf")  # an incomplete download
    truncated.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 2])
    with pytest.raises(VlmError, match="truncated"):
        vlm.load(text, mmproj=truncated)


def test_template_without_image_placeholder(qwen_pair):
    """A text GGUF whose chat template does not place images: each image is written into the
    message as mtmd writes it for the projector (Qwen-VL: vision start/end around it)."""
    from vlm.testing.tiny_llm import CHATML

    model = vlm.load(qwen_pair[0])
    model.tokenizer.chat_template = CHATML
    assert "user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in model.render("hi", 1)
    assert model.prepare("hi", images=[IMAGE]).image_embeds is not None


def test_cli_mmproj_and_info(qwen_pair):
    text, mmproj = qwen_pair
    other = mmproj.with_name("mmproj-b.gguf")
    shutil.copy(mmproj, other)  # two projectors: only --mmproj pairs
    img = text.parent / "img.png"
    IMAGE.save(img)
    code, out, err = run("generate", "-m", text, "--mmproj", other, "-i", img, "-p", PROMPT, "-n", "6",
                         "--quantize", "f32", "-q")
    assert code == 0, err
    want = vlm.load(text, mmproj=other, quantize="f32").generate(PROMPT, images=[img], max_new_tokens=6)
    assert out.rstrip("\n") == want.text
    code, out, err = run("info", text, "--mmproj", other)
    assert code == 0, err
    assert f"mmproj: {other}" in out and "projector: qwen2vl_merger" in out and "architecture: qwen2_vl" in out
    assert "tensors: 82 (82 F32)" in out  # both files' tensors, by stored type
    assert_one_line_error(*run("info", text)[::2], "several vision projectors")


def test_hub_cache_quant_pairs_with_its_mmproj(qwen_pair, tmp_path, monkeypatch):
    """`org/name:QUANT` from the local Hugging Face cache: that GGUF, with the repo's mmproj."""
    from test_hub import cache_repo

    text, mmproj = qwen_pair
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {text.name: text.read_bytes(), mmproj.name: mmproj.read_bytes()}
    snap = cache_repo(tmp_path / "hub", "org/tiny-VL-GGUF", files)
    assert vlm.load("org/tiny-VL-GGUF:F32").info["mmproj"] == str(snap / mmproj.name)
    cache_repo(tmp_path / "hub", "org/two-GGUF", {**files, "mmproj-b.gguf": files[mmproj.name]})
    with pytest.raises(VlmError, match="several vision projectors"):
        vlm.load("org/two-GGUF:F32")
    assert vlm.load("org/two-GGUF:F32", mmproj="mmproj-b.gguf").info["projector"] == "qwen2vl_merger"


# --- a Hugging Face directory whose decoder is a GGUF ---------------------------------------------


def vision_only_dir(hf_dir, dst, text_gguf: str):
    """A copy of a tiny Idefics3 directory holding only its image-side tensors, naming `text_gguf`."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.startswith(("model.vision_model.", "model.connector."))},
              str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vlm_text_gguf": text_gguf}))
    return dst


def test_hf_directory_with_a_gguf_decoder(llama_cpp_pairs, tmp_path):
    hf_dir, folder = llama_cpp_pairs["idefics3"]
    text, _ = pair_files(folder)
    d = vision_only_dir(hf_dir, tmp_path / "vision", "decoder/text.gguf")
    (d / "decoder").mkdir()
    shutil.copy(text, d / "decoder" / "text.gguf")
    want, got = vlm.load(hf_dir, quantize="f32"), vlm.load(d, quantize="f32")
    assert got.info["decoder"] == str(d / "decoder" / "text.gguf")
    a, b = want.prepare(PROMPT, images=[IMAGE]), got.prepare(PROMPT, images=[IMAGE])
    assert np.array_equal(a.ids, b.ids)
    err = rel_error(got.new_session().prefill(b)[0], want.new_session().prefill(a)[0])
    print(f"vlm_text_gguf: logits rel err {err:.2e}")
    assert err <= 1e-4
    full = tmp_path / "full"  # the decoder twice: in the directory and named by vlm_text_gguf
    shutil.copytree(hf_dir, full)
    config = json.loads((full / "config.json").read_text())
    (full / "config.json").write_text(json.dumps({**config, "vlm_text_gguf": str(text)}))
    with pytest.raises(VlmError, match="holds decoder tensors .* but its decoder comes from"):
        vlm.load(full)


def with_adapters(hf_dir, d, rng, targets: list[tuple[str, int, int, int]]):
    """Add LoRA adapters (name, rank, out, in) to d's safetensors; a copy of hf_dir whose decoder
    matrices have them merged (W + B A) is returned beside it."""
    from safetensors.numpy import load_file, save_file

    own, full = load_file(str(d / "model.safetensors")), load_file(str(hf_dir / "model.safetensors"))
    for name, rank, rows, cols in targets:
        a = rng.standard_normal((rank, cols)).astype(np.float32) / np.sqrt(cols)
        b = 0.05 * rng.standard_normal((rows, rank)).astype(np.float32)
        own[f"{name}.lora_A.weight"], own[f"{name}.lora_B.weight"] = a, b
        full[f"{name}.weight"] = full[f"{name}.weight"] + b @ a
    save_file(own, str(d / "model.safetensors"))
    merged = d.parent / "merged"
    shutil.copytree(hf_dir, merged)
    save_file(full, str(merged / "model.safetensors"))
    return merged


def test_hf_directory_gguf_decoder_with_adapters(llama_cpp_pairs, tmp_path):
    """LoRA adapters beside the image side are merged into the GGUF decoder's matrices at load:
    exactly in f32, and before quantizing when a precision is asked for (q8 of the merged
    directory, bit for bit)."""
    hf_dir, folder = llama_cpp_pairs["idefics3"]
    text, _ = pair_files(folder)
    d = vision_only_dir(hf_dir, tmp_path / "vision", str(text))
    c = json.loads((hf_dir / "config.json").read_text())["text_config"]
    hidden, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    targets = [("model.text_model.layers.0.self_attn.q_proj", 4, hidden, hidden),
               ("model.text_model.layers.0.self_attn.v_proj", 4, kv, hidden),
               ("model.text_model.layers.1.mlp.down_proj", 2, hidden, c["intermediate_size"])]
    merged = with_adapters(hf_dir, d, np.random.default_rng(0), targets)
    want, got = vlm.load(merged, quantize="f32"), vlm.load(d, quantize="f32")
    a, b = want.prepare(PROMPT, images=[IMAGE]), got.prepare(PROMPT, images=[IMAGE])
    reference = want.new_session().prefill(a)[0]
    err = rel_error(got.new_session().prefill(b)[0], reference)
    unmerged = rel_error(vlm.load(hf_dir, quantize="f32").new_session().prefill(a)[0], reference)
    print(f"adapters merged: logits rel err {err:.2e} (without them {unmerged:.2e})")
    assert err <= 1e-4 < unmerged
    q8 = [m.new_session().prefill(m.prepare(PROMPT, images=[IMAGE]))[0]
          for m in (vlm.load(merged, quantize="q8"), vlm.load(d, quantize="q8"))]
    assert np.array_equal(*q8)  # quantized after merging


def test_adapters_merge_into_a_quantized_matrix_at_8_bits():
    """A 4-bit matrix with an adapter becomes 8-bit W + B A (4 bits would round B A away)."""
    from vlm.loader import merge_adapters
    from vlm.quant import QuantizedWeight, quantize

    rng = np.random.default_rng(0)
    w = quantize(rng.standard_normal((64, 96)).astype(np.float32), 4, 32)
    a, b = rng.standard_normal((4, 96)).astype(np.float32), 0.01 * rng.standard_normal((64, 4)).astype(np.float32)
    name = "model.layers.0.self_attn.q_proj"
    other = np.ones(64, np.float32)
    out = merge_adapters({f"{name}.weight": w, "model.norm.weight": other},
                         {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}, exact=False, where="test")
    merged, want = out[f"{name}.weight"], w.dequantize() + b @ a
    assert isinstance(merged, QuantizedWeight) and merged.bits == 8
    step = np.abs(want).reshape(64, 3, 32).max(-1, keepdims=True) / 127  # 8-bit symmetric groups of 32
    assert np.all(np.abs(merged.dequantize() - want).reshape(64, 3, 32) <= 0.6 * step)  # half a step + fp16 scale
    assert out["model.norm.weight"] is other
    exact = merge_adapters({f"{name}.weight": w}, {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b},
                           exact=True, where="test")
    np.testing.assert_allclose(exact[f"{name}.weight"], want, rtol=0, atol=1e-6)


def test_adapter_errors(llama_cpp_pairs, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_dir, folder = llama_cpp_pairs["idefics3"]
    text, _ = pair_files(folder)
    d = vision_only_dir(hf_dir, tmp_path / "vision", str(text))
    tensors = load_file(str(d / "model.safetensors"))
    hidden = json.loads((hf_dir / "config.json").read_text())["text_config"]["hidden_size"]
    q = "model.text_model.layers.0.self_attn.q_proj"
    cases = {"has no lora_B": {f"{q}.lora_A.weight": np.zeros((2, hidden), np.float32)},
             "has no matrix": {f"model.text_model.layers.99.self_attn.q_proj.lora_{h}.weight": np.zeros(s, np.float32)
                               for h, s in (("A", (2, hidden)), ("B", (hidden, 2)))},
             r"is lora_A \(2, \d+\), lora_B \(\d+, 3\)": {f"{q}.lora_A.weight": np.zeros((2, hidden), np.float32),
                                                            f"{q}.lora_B.weight": np.zeros((hidden, 3), np.float32)}}
    for message, adapters in cases.items():
        save_file({**tensors, **adapters}, str(d / "model.safetensors"))
        with pytest.raises(VlmError, match=f"{d}: the adapter of model.layers.\\d+.self_attn.q_proj.weight {message}"):
            vlm.load(d)


def test_hf_directory_gguf_decoder_errors(tiny_smolvlm, smollm2_gguf, tmp_path):
    # a known model name, resolved through the registry, whose decoder is not the text_config's
    d = vision_only_dir(tiny_smolvlm, tmp_path / "wrong", "smollm2-135m")
    with pytest.raises(VlmError, match="text_config num_hidden_layers is 2 but the decoder in .*SmolLM2.* has 30"):
        vlm.load(d)
    with pytest.raises(VlmError, match="vlm_text_gguf names missing.gguf, but .* is not a file"):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "vlm_text_gguf": "missing.gguf"}))
        vlm.load(d)
