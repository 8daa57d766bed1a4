"""One in-memory form for every model file we read: Hugging Face directories, GGUF files and
our own converted directories all become a `Checkpoint` (HF config keys, HF tensor names)."""

from __future__ import annotations

import contextlib
import json
import mmap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from vlm.errors import VlmError, shown
from vlm.formats.safetensors import read_checkpoint_tensors
from vlm.models.layers import Weight
from vlm.tokenizer import Tokenizer

NATIVE_CONFIG = "vlm_config.json"  # marks a directory written by `vlm convert`
VISION_PREFIX = "vision."  # converted directories keep vision tensors under this prefix


@dataclass
class Checkpoint:
    config: dict  # config.json as Hugging Face writes it
    tensors: Mapping[str, Weight]  # Hugging Face tensor names (a GGUF file's: made on lookup)
    tokenizer: Tokenizer
    path: Path
    format: str  # "hf", "gguf" or "vlm"
    preprocessor_config: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # tokenizer/processor files to carry on convert
    quantization: dict = field(default_factory=dict)
    mappings: list = field(default_factory=list)  # mmap objects of the weight files

    def release_pages(self) -> None:
        """Drop the file pages this process has touched (repacking reads every weight once).

        They are clean file pages: whatever is still used faults back in on demand, so the
        resident set stays close to the weights actually held.
        """
        for m in self.mappings:
            with contextlib.suppress(OSError, ValueError):
                m.madvise(mmap.MADV_DONTNEED)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: invalid UTF-8
        raise VlmError(f"cannot read {path}: {shown(e)}") from None


def _read_json(path: Path) -> dict:
    """A JSON file that must hold an object (config, tokenizer_config...)."""
    try:
        value = json.loads(_read_text(path))
    except (ValueError, RecursionError) as e:
        raise VlmError(f"cannot read {path}: {shown(e)}") from None
    if not isinstance(value, dict):
        raise VlmError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _chat_template(template: object, path: Path) -> str | None:
    """The default chat template of a tokenizer config: a string, or a list of named ones."""
    if isinstance(template, list):  # several named templates: use the default one
        named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
        template = next((t["template"] for t in named if t.get("name") == "default"),
                        named[0]["template"] if named else None)
    if template is not None and not isinstance(template, str):
        raise VlmError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return template


def _token_text(t) -> str | None:
    text = t.get("content") if isinstance(t, dict) else t
    return text if isinstance(text, str) else None


def read_hf_tokenizer(directory: Path, config: dict) -> tuple[Tokenizer, dict[str, str]]:
    """tokenizer.json + tokenizer_config.json (+ chat template files), and their texts for convert."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise VlmError(f"no tokenizer.json in {directory}")
    files = {"tokenizer.json": _read_text(path)}
    try:
        tok = HFTokenizer.from_str(files["tokenizer.json"])
    except Exception as e:  # the tokenizers library raises its own exception types
        raise VlmError(f"cannot read {path}: {e}") from None
    tcfg = {}
    for name in ("tokenizer_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json"):
        if (directory / name).is_file():
            files[name] = _read_text(directory / name)
    if "tokenizer_config.json" in files:
        tcfg = _read_json(directory / "tokenizer_config.json")
    template = tcfg.get("chat_template")
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"]
    elif "chat_template.json" in files:
        template = _read_json(directory / "chat_template.json").get("chat_template", template)
    template = _chat_template(template, directory)
    extra_eos = []
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {},
                   _read_json(directory / "generation_config.json") if "generation_config.json" in files else {}):
        e = source.get("eos_token_id")
        extra_eos += [i for i in (e if isinstance(e, list) else [e]) if isinstance(i, int)]
    bos = _token_text(tcfg.get("bos_token"))
    # Without add_bos_token, a post-processor that inserts BOS is how the checkpoint says "add BOS".
    post = json.loads(files["tokenizer.json"]).get("post_processor") or {}
    adds_bos = bos is not None and isinstance(post, dict) and json.dumps(bos) in json.dumps(post.get("single", []))
    add_bos = bool(tcfg.get("add_bos_token", adds_bos))
    return Tokenizer(tok, template, bos, _token_text(tcfg.get("eos_token")), add_bos=add_bos,
                     extra_eos=extra_eos), files


def read_processor_config(directory: Path, files: dict[str, str]) -> dict:
    """processor_config.json updated by preprocessor_config.json; their texts are added to `files`."""
    pre = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (directory / name).is_file():
            pre.update(_read_json(directory / name))
            files[name] = _read_text(directory / name)
    return pre


def read_hf(directory: Path) -> Checkpoint:
    config = _read_json(directory / "config.json")
    tokenizer, files = read_hf_tokenizer(directory, config)
    pre = read_processor_config(directory, files)
    tensors, mappings = read_checkpoint_tensors(directory)
    return Checkpoint(config, tensors, tokenizer, directory, "hf", pre, files, mappings=mappings)


def read_gguf(path: Path) -> Checkpoint:
    from vlm.formats.gguf import load_gguf_checkpoint

    g = load_gguf_checkpoint(path)
    tok = g.tokenizer
    bos = tok.id_to_token(g.bos_token_id) if g.bos_token_id is not None else None
    eos = tok.id_to_token(g.eos_token_id) if g.eos_token_id is not None else None
    tokenizer = Tokenizer(tok, g.chat_template, bos, eos, add_bos=g.add_bos_token)
    files = {"tokenizer.json": tok.to_str(),
             "tokenizer_config.json": json.dumps({"chat_template": g.chat_template, "bos_token": bos,
                                                  "eos_token": eos, "add_bos_token": g.add_bos_token})}
    return Checkpoint(dict(g.config), g.tensors, tokenizer, path, "gguf", {}, files,
                      mappings=[g.mapping] if g.mapping is not None else [])


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported model file or directory, memory-mapped."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return read_gguf(path)
        raise VlmError(f"unrecognised model file {path} (expected a .gguf file or a model directory)")
    if not path.is_dir():
        raise VlmError(f"model not found: {path}")
    if (path / NATIVE_CONFIG).is_file():
        from vlm.formats.native import read_native

        return read_native(path)
    if (path / "config.json").is_file():
        return read_hf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return read_gguf(ggufs[0])
    raise VlmError(f"{path} holds no model (expected config.json, {NATIVE_CONFIG} or one .gguf file)")
