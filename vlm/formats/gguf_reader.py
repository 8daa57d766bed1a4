"""GGUF files as a `Checkpoint`: the tensors, config and tokenizer formats/gguf.py reads."""

from __future__ import annotations

import json
from pathlib import Path

from vlm.formats.checkpoint import Checkpoint
from vlm.formats.gguf import load_gguf_checkpoint
from vlm.tokenizer import Tokenizer


def read_gguf(path: Path) -> Checkpoint:
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
