"""A `tokenizers.Tokenizer` rebuilt from the vocabulary a GGUF file carries in its metadata.

The target is llama.cpp's own tokenization of the same file, id for id: byte-level BPE over the
file's tokens and merges, text split first by the pre-tokenizer regexes llama.cpp picks for
`tokenizer.ggml.pre` (src/llama-vocab.cpp), and control / user-defined tokens matched whole
in the text.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from vlm.errors import VlmError

# The split regexes, as the models' tokenizer.json files write them (llama.cpp hand-codes or
# rewrites some of them, to the same effect).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's "default" (also its choice when a file names no pre-tokenizer): a chain of splits.
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre names, grouped as llama.cpp groups them. GPT-2's regex is ByteLevel's built-in one.
_GPT2_PRE = ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
_LLAMA3_KEEP_MERGES_PRE = ("dbrx", "smaug-bpe")  # llama3's regex, but llama.cpp applies all merges
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")

# pre-tokenizers for which llama.cpp adds BOS when the file does not say.
_ADD_BOS_PRE = _LLAMA3_PRE + ("tekken", "chameleon")

# llama.cpp token types that are matched whole in the text: UNKNOWN (2) and CONTROL (3) are special
# (dropped by skip_special_tokens), USER_DEFINED (4) is not.
_SPECIAL_TYPES = (2, 3)
_USER_DEFINED = 4


def gguf_add_bos(metadata: Mapping[str, Any]) -> bool:
    """Whether llama.cpp prepends BOS to a prompt for this file (the flag, or its default)."""
    flag = metadata.get("tokenizer.ggml.add_bos_token")
    if flag is not None:
        return bool(flag)
    return (
        metadata.get("tokenizer.ggml.model") == "llama" or metadata.get("tokenizer.ggml.pre") in _ADD_BOS_PRE
    )


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for llama.cpp's `pre` name, and whether BPE ignores merges for whole-token words."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "default":
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _DEFAULT_SPLITS]
        return pre_tokenizers.Sequence([*splits, byte_level]), False
    if pre in _LLAMA3_PRE or pre in _LLAMA3_KEEP_MERGES_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), pre in _LLAMA3_PRE
    if pre in _QWEN2_PRE:
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), False
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    if pre not in _GPT2_PRE:
        warnings.warn(
            f"unknown GGUF pre-tokenizer {pre!r}: splitting text with GPT-2's regex; "
            "tokens may differ from the model's own tokenizer",
            stacklevel=3,
        )
    return gpt2, False


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build the byte-level BPE tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.

    Control and user-defined tokens (`<|im_start|>`, ...) are added tokens, matched whole in the
    text; control ones are special. BOS is added by `encode` only when the file asks for it
    (`tokenizer.ggml.add_bos_token`); `encode(text, add_special_tokens=False)` never adds it.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise VlmError("the GGUF file carries no tokenizer (no tokenizer.ggml.model)")
    if kind != "gpt2":
        raise VlmError(
            f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level BPE) is supported"
        )
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    merges_text = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges_text is None:
        raise VlmError("the GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise VlmError("the GGUF tokenizer vocabulary has duplicate tokens")
    merges = []
    for m in merges_text:
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise VlmError(f"malformed GGUF tokenizer merge {m!r}")
        if m[:cut] + m[cut + 1 :] not in vocab:  # the tokenizers library would panic on it
            raise VlmError(f"invalid GGUF tokenizer: merge {m!r} makes a token missing from the vocabulary")
        merges.append((m[:cut], m[cut + 1 :]))

    pre, ignore_merges = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "default")))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges of unknown tokens
        raise VlmError(f"invalid GGUF tokenizer: {e}") from None
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()

    types = metadata.get("tokenizer.ggml.token_type")
    if types is not None:
        if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) < len(tokens):
            raise VlmError("malformed GGUF tokenizer.ggml.token_type (not one integer per token)")
        types = types[: len(tokens)].tolist()
        tok.add_special_tokens(
            [
                AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(types)
                if t in _SPECIAL_TYPES
            ]
        )
        tok.add_tokens(
            [
                AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types)
                if t == _USER_DEFINED
            ]
        )

    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if gguf_add_bos(metadata) and type(bos) is int and 0 <= bos < len(tokens):
        # list form: a token's text may contain spaces
        tok.post_processor = processors.TemplateProcessing(
            single=[tokens[bos], "$A"], special_tokens=[(tokens[bos], bos)]
        )
    return tok
