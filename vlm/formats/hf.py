"""Hugging Face model directories: config.json, safetensors weights, tokenizer and processor files."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from vlm.errors import VlmError
from vlm.formats.checkpoint import Checkpoint, read_json, read_text
from vlm.formats.safetensors import read_checkpoint_tensors
from vlm.tokenizer import Tokenizer


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
    files = {"tokenizer.json": read_text(path)}
    try:
        tok = HFTokenizer.from_str(files["tokenizer.json"])
    except Exception as e:  # the tokenizers library raises its own exception types
        raise VlmError(f"cannot read {path}: {e}") from None
    tcfg = {}
    for name in ("tokenizer_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json"):
        if (directory / name).is_file():
            files[name] = read_text(directory / name)
    if "tokenizer_config.json" in files:
        tcfg = read_json(directory / "tokenizer_config.json")
    template = tcfg.get("chat_template")
    if "chat_template.jinja" in files:
        template = files["chat_template.jinja"]
    elif "chat_template.json" in files:
        template = read_json(directory / "chat_template.json").get("chat_template", template)
    template = _chat_template(template, directory)
    extra_eos = []
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {},
                   read_json(directory / "generation_config.json") if "generation_config.json" in files else {}):
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
            pre.update(read_json(directory / name))
            files[name] = read_text(directory / name)
    return pre


def read_hf(directory: Path) -> Checkpoint:
    config = read_json(directory / "config.json")
    tokenizer, files = read_hf_tokenizer(directory, config)
    pre = read_processor_config(directory, files)
    tensors, mappings = read_checkpoint_tensors(directory)
    return Checkpoint(config, tensors, tokenizer, directory, "hf", pre, files, mappings=mappings)
