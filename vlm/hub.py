"""Models in the Hugging Face cache, named by repo id: `org/name`, or `org/name:QUANT` for one GGUF of
a quant ladder (llama.cpp's `-hf` convention).

Resolving reads the local cache only (no network): $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub, where a repo lives in models--org--name/ and refs/main names the snapshot
(snapshots/<commit>/) that holds its files. `pull` fills that cache through huggingface_hub (an
optional dependency), with its progress bars and resumable downloads.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vlm.errors import VlmError

# org/name, optionally :QUANT; the characters the Hub allows in ids.
_REPO_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<quant>[\w.-]+))?")
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's -hf picks from a quant ladder when none is named
_HF_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]  # a transformers directory, no .bin twins


def is_repo_spec(text: str) -> bool:
    """True for `org/name` or `org/name:QUANT` (which may also be a relative path: check that first)."""
    return _REPO_SPEC.fullmatch(text) is not None


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


@dataclass(frozen=True)
class HubModel:
    """What a repo spec resolved to: the model (a GGUF file or a snapshot directory) and the
    repo's vision projector files (mmproj*.gguf), for pairing with a GGUF text model."""

    path: Path
    mmproj: tuple[Path, ...] = ()


def _split(spec: str) -> tuple[str, str | None]:
    m = _REPO_SPEC.fullmatch(spec)
    if m is None:
        raise VlmError(f"not a Hugging Face repo id: {spec!r} (expected org/name or org/name:QUANT)")
    return m["repo"], m["quant"]


def _is_mmproj(name: str) -> bool:
    return Path(name).name.lower().startswith("mmproj") and name.lower().endswith(".gguf")


def _pick_gguf(names: list[str], quant: str | None, where: str) -> str | None:
    """The GGUF of `quant` (case-insensitive, a whole token of the file name) among `names`; without a
    quant, the only GGUF or the default quant's; None when there is no GGUF at all."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and not _is_mmproj(n))
    if not ggufs:
        if quant:
            raise VlmError(f"{where} holds no GGUF file, so it has no quant {quant}")
        return None
    wanted = quant or (DEFAULT_QUANT if len(ggufs) > 1 else None)
    if wanted is None:
        return ggufs[0]
    token = re.compile(rf"(?<![a-z0-9]){re.escape(wanted.lower())}(?![a-z0-9])")
    matches = [n for n in ggufs if token.search(Path(n).name.lower())]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(Path(n).name for n in ggufs)
    if not matches:
        hint = f"no {wanted} GGUF" if quant else f"several GGUFs and no {DEFAULT_QUANT}: name one with :QUANT"
        raise VlmError(f"{where}: {hint}; files: {choices}")
    raise VlmError(f"{where}: {wanted} matches several files ({', '.join(Path(n).name for n in matches)})")


def snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of `repo` (refs/main, else the only snapshot), or None."""
    root = cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    if ref.is_file():
        folder = root / "snapshots" / ref.read_text().strip()
        return folder if folder.is_dir() else None
    found = [p for p in (root / "snapshots").glob("*") if p.is_dir()]
    return found[0] if len(found) == 1 else None


def find(spec: str) -> HubModel:
    """Resolve `org/name[:QUANT]` in the local cache, with no network; VlmError when not there."""
    repo, quant = _split(spec)
    folder = snapshot(repo)
    if folder is None:
        raise VlmError(f"{repo} is not in the Hugging Face cache ({cache_dir()}); fetch it with `vlm pull {spec}`")
    names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    mmproj = tuple(folder / n for n in sorted(names) if _is_mmproj(n))
    gguf = _pick_gguf(names, quant, f"{repo} (cached)")
    if gguf is not None:
        return HubModel(folder / gguf, mmproj)
    if not (folder / "config.json").is_file():
        raise VlmError(f"{repo} (cached at {folder}) has neither a GGUF file nor a config.json")
    return HubModel(folder, mmproj)


def _check_resolves(endpoint: str) -> None:
    """Raise at once if the Hub's host name does not resolve (no network): huggingface_hub would
    retry that five times over 23 s, printing each try, before failing."""
    host = urllib.parse.urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host}: {e.strerror}") from None


def pull(spec: str) -> HubModel:
    """Download `org/name[:QUANT]` into the Hugging Face cache (a GGUF repo: that quant's file and the
    mmproj files; otherwise the transformers files), resuming partial downloads; returns `find(spec)`."""
    repo, quant = _split(spec)
    try:
        import huggingface_hub
        from huggingface_hub.constants import ENDPOINT
    except ImportError:
        raise VlmError(f"pulling {repo} needs huggingface_hub: pip install huggingface_hub") from None
    try:
        _check_resolves(ENDPOINT)
        names = huggingface_hub.list_repo_files(repo)
        gguf = _pick_gguf(names, quant, repo)
        if gguf is None:
            huggingface_hub.snapshot_download(repo, allow_patterns=_HF_FILES, cache_dir=cache_dir())
        else:
            for name in [gguf, *sorted(n for n in names if _is_mmproj(n))]:
                huggingface_hub.hf_hub_download(repo, name, cache_dir=cache_dir())
    except VlmError:
        raise
    except Exception as e:  # network, auth, missing repo: huggingface_hub raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VlmError(f"could not download {repo} from the Hugging Face Hub (offline?): {reason}") from None
    return find(spec)
