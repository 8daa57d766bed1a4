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

from vlm.errors import VlmError, shown


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


# Bounds on rendering a chat template, which comes from a downloaded file: range() elements in
# one render (nested loops multiply), and characters of output (a prompt must fit a context).
TEMPLATE_RANGE_BUDGET = 100_000
TEMPLATE_MAX_CHARS = 4_000_000


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' immutable sandbox, with `*` and `**` bounded: "x" * 10**9 is refused."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left, right):
        if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("exponent too large in a chat template")
        if operator == "*" and any(isinstance(x, str | list | tuple) for x in (left, right)):
            n = right if isinstance(left, str | list | tuple) else left
            seq = left if isinstance(left, str | list | tuple) else right
            if isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                raise jinja2.exceptions.SecurityError("a chat template repeated a string beyond the output cap")
        return super().call_binop(context, operator, left, right)


def _bounded_range():
    """A `range` for one render: all the ranges it makes hold at most TEMPLATE_RANGE_BUDGET elements."""
    left = TEMPLATE_RANGE_BUDGET

    def bounded(*args):
        nonlocal left
        r = range(*args)
        left -= len(r)
        if left < 0:
            raise jinja2.exceptions.SecurityError(f"a chat template looped over more than {TEMPLATE_RANGE_BUDGET:,} "
                                                  "range() elements")
        return r

    return bounded


@lru_cache(maxsize=8)
def _template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def check_message(m: object) -> None:
    """VlmError unless `m` is a chat message: a dict with a role and a content that is a string
    or a list of parts (dicts such as {"type": "text", "text": ...} or {"type": "image"})."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise VlmError("each message must be a dict with 'role' and 'content'")
    content = m["content"]
    if not isinstance(m["role"], str):
        raise VlmError(f"a message's role must be a string, got {type(m['role']).__name__}")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise VlmError("a message's content list must hold dicts such as {'type': 'text', 'text': '...'}")
    elif not isinstance(content, str):
        raise VlmError(f"a message's content must be a string or a list of parts, got {type(content).__name__}")


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
        if not isinstance(text, str):
            raise VlmError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (a command line's, say)
            raise VlmError("the text is not valid UTF-8") from None
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
            pieces = _template(self.chat_template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, range=_bounded_range(),
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
            out, size = [], 0
            for piece in pieces:
                size += len(piece)
                if size > TEMPLATE_MAX_CHARS:
                    raise VlmError(f"the chat template rendered more than {TEMPLATE_MAX_CHARS:,} characters")
                out.append(piece)
            return "".join(out)
        except VlmError:
            raise
        except Exception as e:  # a template from a file can raise anything (TypeError, RecursionError...)
            kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
            raise VlmError(f"chat template error: {kind}{shown(e, 160)}") from None


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
