"""Tokenizer, chat template and streaming detokenization.

Wraps a `tokenizers.Tokenizer` (from tokenizer.json, or built from a GGUF vocabulary) and
renders chat templates with the same Jinja settings transformers uses, so prompts come out
byte for byte as the reference renders them.
"""

from __future__ import annotations

import itertools
import json
from array import array
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from vlm.errors import VlmError


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-ins for the 256 byte values, reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(b)
        else:
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(range(256), chars, strict=True)}


@lru_cache(maxsize=8)
def _template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens."""

    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos: bool = False, extra_eos: Iterable[int] = ()):
        self.tok = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos = add_bos
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos = {tokenizer.token_to_id(eos_token)} if eos_token else set()
        self.eos_ids = {i for i in eos | set(extra_eos) if i is not None}
        self._token_bytes = self._build_token_bytes()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _build_token_bytes(self) -> tuple[bytes, array] | None:
        """Exact bytes of every token for byte-level BPE vocabularies (None otherwise): all of
        them in one string, token i at [offsets[i], offsets[i + 1]). One string, not 150k bytes
        objects: a few MB less per loaded model."""
        decoder = _byte_decoder()
        special = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        vocab = self.tok.get_vocab(with_added_tokens=True)
        pieces: list[bytes] = [b""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            if piece in special:
                pieces[i] = piece.encode("utf-8")
            elif all(ch in decoder for ch in piece):
                pieces[i] = bytes(decoder[ch] for ch in piece)
            else:
                return None
        return b"".join(pieces), array("q", [0, *itertools.accumulate(map(len, pieces))])

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are matched as such."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self._token_bytes is not None:
            return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        if self._token_bytes is not None:
            blob, offsets = self._token_bytes
            return blob[offsets[i] : offsets[i + 1]] if 0 <= i < len(offsets) - 1 else b""
        return self.tok.decode([i], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages exactly as transformers' `apply_chat_template(tokenize=False)` does."""
        if not self.chat_template:
            raise VlmError("this model has no chat template; pass a plain prompt with raw=True or token ids")
        try:
            return _template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise VlmError(f"chat template error: {e}") from None


class StreamDecoder:
    """Turns generated token ids into text pieces that never split a UTF-8 character,
    holding back any tail that could be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        self.pending = b""  # bytes not yet forming whole characters
        self.held = ""  # text withheld because it may begin a stop string
        self.text = ""  # everything emitted
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now safe to show (maybe empty)."""
        self.pending += self.tokenizer.token_bytes(token)
        try:
            new = self.pending.decode("utf-8")
            self.pending = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":  # an invalid byte, not a character still arriving
                new, self.pending = self.pending.decode("utf-8", errors="replace"), b""
            else:
                new, self.pending = self.pending[: e.start].decode("utf-8"), self.pending[e.start :]
        return self._release(self.held + new)

    def _release(self, text: str) -> str:
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                text = text[:at]
                self.held = ""
                self.text += text
                return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        out, self.held = (text[:-keep], text[-keep:]) if keep else (text, "")
        self.text += out
        return out

    def flush(self) -> str:
        """Whatever is left at the end of generation."""
        tail = self.held + self.pending.decode("utf-8", errors="replace")
        self.held, self.pending = "", b""
        self.text += tail
        return tail
