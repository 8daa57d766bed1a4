"""Models named by Hugging Face repo id: the local hub cache (laid out here, no network) and `vlm pull`."""

import socket
import sys

import pytest

import vlm
from vlm import hub
from vlm.cli import main
from vlm.errors import VlmError
from vlm.registry import resolve


def cache_repo(cache, repo: str, files: dict[str, bytes], sha: str = "0123abcd") -> object:
    """A repo as huggingface_hub caches it: blobs, snapshots/<sha>/ of links to them, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / sha
    for name, data in files.items():
        blob = root / "blobs" / f"{sha}-{name.replace('/', '-')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(blob)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    return tmp_path / "hub"


LADDER = {"SmolLM2-135M-Instruct-Q4_K_M.gguf": b"a", "SmolLM2-135M-Instruct-q8_0.gguf": b"b",
          "SmolLM2-135M-Instruct-Q4_K_S.gguf": b"c", "mmproj-SmolLM2-f16.gguf": b"d"}


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


def test_quant_picks_its_gguf_and_notes_the_mmproj(cache):
    snap = cache_repo(cache, "org/ladder", LADDER)
    got = hub.find("org/ladder:Q8_0")  # case-insensitive
    assert got.path == snap / "SmolLM2-135M-Instruct-q8_0.gguf"
    assert got.mmproj == (snap / "mmproj-SmolLM2-f16.gguf",)
    assert hub.find("org/ladder:q4_k_m").path.name == "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    assert hub.find("org/ladder").path.name == "SmolLM2-135M-Instruct-Q4_K_M.gguf"  # llama.cpp's default
    with pytest.raises(VlmError, match="Q4_K matches several files"):
        hub.find("org/ladder:Q4_K")
    with pytest.raises(VlmError, match="no IQ4_NL GGUF.*q8_0.gguf"):
        hub.find("org/ladder:IQ4_NL")


def test_transformers_repo_resolves_to_its_snapshot(cache):
    snap = cache_repo(cache, "org/hf-model", {"config.json": b"{}", "model.safetensors": b""})
    cache_repo(cache, "org/hf-model", {"config.json": b"{}"}, sha="old")  # refs/main is now "old"
    (cache / "models--org--hf-model" / "refs" / "main").write_text(snap.name + "\n")
    assert resolve("org/hf-model") == snap
    with pytest.raises(VlmError, match="org/missing is not in the Hugging Face cache .*vlm pull org/missing"):
        resolve("org/missing")


def test_load_by_repo_id(cache, smollm2_gguf):
    cache_repo(cache, "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {"smollm2-135m-instruct-q4_1.gguf":
                                                                 smollm2_gguf.read_bytes()})
    model = vlm.load("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1")
    assert model.decoder.config.num_hidden_layers == 30
    assert model.info["path"].endswith("smollm2-135m-instruct-q4_1.gguf")


def test_pull_without_huggingface_hub_or_network_is_one_line(cache, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    assert main(["pull", "org/nothing:Q4_K_M"]) == 1  # HF_HUB_OFFLINE: refused without a request
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm: error: could not download org/nothing from the Hugging Face Hub (offline?)")
    assert "\n" not in err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(VlmError, match="needs huggingface_hub: pip install huggingface_hub"):
        hub.pull("org/nothing")


def test_pull_with_no_name_resolution_fails_at_once(cache, monkeypatch, capsys):
    """Offline (the Hub's host does not resolve): one line, before huggingface_hub's retries
    (five, 23 s, each printed) begin."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", never)
    assert main(["pull", "org/nothing:Q4_K_M"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("vlm: error: could not download org/nothing from the Hugging Face Hub (offline?): "
                   "cannot resolve huggingface.co: Name or service not known")


def test_pull_fetches_the_quant_and_mmproj(cache, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fetched = []

    def download(repo, name, cache_dir):
        fetched.append(name)
        return str(cache_repo(cache_dir, repo, {name: LADDER[name]}) / name)

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])  # online: the host resolves
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: list(LADDER))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    got = hub.pull("org/ladder:Q8_0")
    assert fetched == ["SmolLM2-135M-Instruct-q8_0.gguf", "mmproj-SmolLM2-f16.gguf"]
    assert got.path.name == "SmolLM2-135M-Instruct-q8_0.gguf" and len(got.mmproj) == 1
