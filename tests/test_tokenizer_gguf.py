"""The tokenizer rebuilt from GGUF metadata must give llama.cpp's ids exactly.

References: llama.cpp itself (llama-cpp-python, vocab only) and transformers' GGUF tokenizer.
All three agree on the real SmolLM2 vocabulary. transformers does not follow llama.cpp in general
(checked with `test_pre_tokenizers_match_llama_cpp`'s files, which add multi-digit and merge-less
tokens to that vocabulary); we follow llama.cpp:
- pre `smollm`: transformers splits with GPT-2's regex alone; llama.cpp (and SmolLM2's own
  tokenizer.json) first cuts text into single digits. Invisible on SmolLM2, which has no
  multi-digit token.
- pre `llama-bpe`: llama.cpp takes a word that is itself a token whole (`ignore_merges`, as
  Llama 3's tokenizer.json says); transformers applies the merges.
- pre `default`: llama.cpp chains four regexes (punctuation runs, GPT-2, numbers, three digits);
  transformers uses GPT-2's regex.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from vlm.errors import VlmError
from vlm.formats.tokenizer_gguf import tokenizer_from_gguf
from vlm.testing.transformers_gguf import gguf_tokenizer

TEXTS = [
    "Hello, world! This is a test.",
    "12345 3.14 0.5e-10 1,000,000 x2y",
    "def f(x):\n    return x**2  # square\n\tpass\n",
    "multiple   spaces\n\n\nnewlines\t\ttabs \n \n",
    "  leading and trailing  ",
    "é ß 日本語 Привет мир 👍🏽 🇫🇷 Ω≈ç√ 𝕳𝖊𝖑𝖑𝖔 ﬁ ＡＢＣ１２３ ٱلْعَرَبِيَّة हिन्दी",
    "don't I'm we'll they've she'd IT'S",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>x<repo_name> <|im_start |> <|im_end|",
    "a\r\nb\rc \u00a0nbsp\u2009thin\u3000ideo",
    "https://example.com/a?b=c&d=e#f  ...x !! a $x foo`bar` ~y",
    "   ",
    "\n",
    "",
]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _tiny_metadata(pre: str = "gpt-2", **extra) -> dict:
    """A small byte-level vocabulary: all bytes, a few merges, control and user-defined tokens."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġ 1", "1 2"]
    tokens = _byte_alphabet() + ["he", "ll", "hell", "hello", "Ġw", "12", "Ġ1", "Ġzqxj"]
    tokens += ["<|im_start|>", "<|im_end|>", "<think>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 4]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": len(tokens) - 3,
        **extra,
    }


def _pieces(tok, text: str) -> list[str]:
    return tok.encode(text, add_special_tokens=False).tokens


# --- a small vocabulary, no external reference needed --------------------------------------------------


def test_special_and_user_defined_tokens_are_whole():
    tok = tokenizer_from_gguf(_tiny_metadata())
    ids = tok.encode("<|im_start|>hello<think> world<|im_end|>").ids
    start, end, think = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<think>"))
    assert ids == [
        start,
        tok.token_to_id("hello"),
        think,
        tok.token_to_id("Ġw"),
        *map(tok.token_to_id, "orld"),
        end,
    ]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<think> world<|im_end|>"
    assert tok.decode(ids) == "hello<think> world"  # control tokens are special, user-defined are not


def test_byte_fallback_round_trips_any_text():
    tok = tokenizer_from_gguf(_tiny_metadata())
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    ("pre", "text", "expected"),
    [
        ("gpt-2", "x 123", ["x", "Ġ1", "2", "3"]),
        ("smollm", "x 123", ["x", "Ġ", "1", "2", "3"]),  # single digits first, then GPT-2
        ("qwen2", "x 123", ["x", "Ġ", "1", "2", "3"]),
        ("llama-bpe", "x 123", ["x", "Ġ", "12", "3"]),  # up to three digits per word
        ("default", "x 123", ["x", "Ġ", "12", "3"]),
        ("llama-bpe", " zqxj", ["Ġzqxj"]),  # llama3 takes a word that is a token whole (ignore_merges)
        ("qwen2", " zqxj", ["Ġ", "z", "q", "x", "j"]),
    ],
)
def test_pre_tokenizer_choice(pre, text, expected):
    assert _pieces(tokenizer_from_gguf(_tiny_metadata(pre)), text) == expected


def test_default_pre_splits_punctuation_off_spaces():
    tok = tokenizer_from_gguf(_tiny_metadata("default"))
    assert tok.pre_tokenizer.pre_tokenize_str(" ...x") == [("Ġ", (0, 1)), ("...", (1, 4)), ("x", (4, 5))]
    gpt2 = tokenizer_from_gguf(_tiny_metadata("gpt-2"))
    assert [p for p, _ in gpt2.pre_tokenizer.pre_tokenize_str(" ...x")] == ["Ġ...", "x"]


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe", "gpt-2", "default"])
def test_serializes_to_tokenizer_json(pre):
    """`vlm convert` stores the rebuilt tokenizer as tokenizer.json: it must read back the same."""
    tok = tokenizer_from_gguf(_tiny_metadata(pre, **{"tokenizer.ggml.add_bos_token": True}))
    again = Tokenizer.from_str(tok.to_str())
    for text in [*TEXTS, "x 123 zqxj <think>"]:
        assert again.encode(text).ids == tok.encode(text).ids


def test_bos_only_when_the_file_asks():
    md = _tiny_metadata()
    bos = md["tokenizer.ggml.bos_token_id"]
    assert tokenizer_from_gguf(md).encode("he").ids == [md["tokenizer.ggml.tokens"].index("he")]
    tok = tokenizer_from_gguf({**md, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("he").ids[0] == bos and tok.encode("he", add_special_tokens=False).ids[0] != bos
    assert tokenizer_from_gguf(_tiny_metadata("llama-bpe")).encode("he").ids[0] == bos  # llama.cpp's default
    no = tokenizer_from_gguf(_tiny_metadata("llama-bpe", **{"tokenizer.ggml.add_bos_token": False}))
    assert no.encode("he").ids[0] != bos


def test_unknown_pre_warns_and_uses_gpt2():
    with pytest.warns(UserWarning, match="unknown GGUF pre-tokenizer 'brand-new'"):
        tok = tokenizer_from_gguf(_tiny_metadata("brand-new"))
    assert _pieces(tok, "x 123") == ["x", "Ġ1", "2", "3"]


def test_bad_tokenizers():
    with pytest.raises(VlmError, match="unsupported GGUF tokenizer model 'llama'.*only 'gpt2'"):
        tokenizer_from_gguf({**_tiny_metadata(), "tokenizer.ggml.model": "llama"})
    with pytest.raises(VlmError, match="no tokenizer"):
        tokenizer_from_gguf({})
    md = _tiny_metadata()
    with pytest.raises(VlmError, match="duplicate"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + ["he"]})
    with pytest.raises(VlmError, match="invalid GGUF tokenizer"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.merges": ["h e", "q NOT_A_TOKEN"]})
    # both halves known but their join is not a token: the tokenizers library would panic
    with pytest.raises(VlmError, match="merge 'q h' makes a token missing from the vocabulary"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.merges": ["h e", "q h"]})
    with pytest.raises(VlmError, match="malformed"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.merges": ["he"]})
    with pytest.raises(VlmError, match="malformed GGUF tokenizer.ggml.token_type"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"][:-1]})


# --- the real SmolLM2 vocabulary against llama.cpp and transformers -------------------------------------


@pytest.fixture(scope="module")
def real_metadata(smollm2_gguf) -> dict:
    from vlm.formats.gguf import GGUFFile

    return GGUFFile(smollm2_gguf).metadata


@pytest.fixture(scope="module")
def real_tokenizer(real_metadata):
    return tokenizer_from_gguf(real_metadata)


def _llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _llama_cpp_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def test_real_chat_markup(real_tokenizer):
    ids = real_tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == 1 and ids[-2] == 2 and len(ids) == 6


def test_real_round_trip(real_tokenizer):
    for text in TEXTS:
        ids = real_tokenizer.encode(text).ids
        assert real_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_real_matches_llama_cpp(real_tokenizer, smollm2_gguf):
    llm = _llama_cpp_vocab(smollm2_gguf)
    for text in TEXTS:
        assert real_tokenizer.encode(text).ids == _llama_cpp_ids(llm, text), text


def test_real_matches_transformers(real_tokenizer, smollm2_gguf):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    hf = gguf_tokenizer(smollm2_gguf)
    for text in TEXTS:
        assert real_tokenizer.encode(text).ids == hf.encode(text, add_special_tokens=False), text


PRE_TYPES = ["smollm", "qwen2", "llama-bpe", "gpt-2", "default"]


@pytest.fixture(scope="module")
def variant_files(real_metadata, tmp_path_factory) -> dict[str, Path]:
    """The real vocabulary plus multi-digit and merge-less tokens, under each pre-tokenizer."""
    gguf = pytest.importorskip("gguf")
    tokens = real_metadata["tokenizer.ggml.tokens"] + ["12", "34", "123", "Ġ1", "Ġ12", "Ġzqxj"]
    merges = real_metadata["tokenizer.ggml.merges"] + ["1 2", "3 4", "12 3", "Ġ 1", "Ġ1 2"]
    types = real_metadata["tokenizer.ggml.token_type"].tolist() + [1] * 6
    out = {}
    for pre in PRE_TYPES:
        path = tmp_path_factory.mktemp("vocab") / f"{pre}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        # llama.cpp reads these hyperparameters even for a vocabulary-only load
        w.add_block_count(1)
        w.add_context_length(128)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_head_count(4)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[pre] = path
    return out


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list(" a1!`$+<=>^~|'\"#%&*()-_.,;:?/\\@[]{}\n\t\r") + [
        "é",
        "日",
        "€",
        "«",
        "—",
        "¿",
        "\u00a0",
        "\u3000",
        "Я",
        "👍",
        "🏽",
        "ß",
        "Ｑ",
        "١",
        "²",
        "'s",
        "'S",
        "'ll",
        "'Re",
        " 12",
        "123",
        "34",
        " zqxj",
        "ab",
        "<|im_start|>",
        "<|im_end|>",
        "  ",
        " \n",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(n)]


@pytest.mark.parametrize("pre", PRE_TYPES)
def test_pre_tokenizers_match_llama_cpp(variant_files, pre):
    from vlm.formats.gguf import GGUFFile

    path = variant_files[pre]
    llm = _llama_cpp_vocab(path)
    tok = tokenizer_from_gguf(GGUFFile(path).metadata)
    for text in TEXTS + _random_texts(400, seed=PRE_TYPES.index(pre)):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == _llama_cpp_ids(llm, text), (pre, text, _pieces(tok, text))
        assert tok.decode(ids, skip_special_tokens=False) == text
