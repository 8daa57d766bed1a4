"""A loaded model: tokenizer + decoder (+ a vision family), with the generation loop.

The model glue is ready: families plug in through the interface below (see `VisionFamily`).
The whole request path reads top to bottom:
prepare (template, images, token ids, positions) -> prefill in chunks, reusing the cached
prefix -> decode one token at a time -> stream text, stop on EOS / stop strings / length.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from vlm import kernels
from vlm.errors import VlmError
from vlm.generation import (
    GenerationResult,
    GenerationStats,
    Sampler,
    SamplingParams,
    TextStream,
    peak_memory_mb,
)
from vlm.image import ImageInput, load_image
from vlm.models.llama import LlamaModel
from vlm.session import PromptInputs, Session
from vlm.tokenizer import StreamDecoder, Tokenizer

Prompt = str | Sequence[dict] | Sequence[int]

# Decoded image embeddings kept for reuse (a chat shows the same image every turn).
IMAGE_CACHE_ENTRIES = 16


class VisionFamily(Protocol):
    """What a vision-language family (models/<family>/family.py) provides to the shared glue."""

    image_token: str  # placeholder the chat template writes once per image
    image_token_id: int

    def preprocess(self, image, **options) -> Any: ...  # -> object with .n_tokens and .digest
    def encode(self, images: list) -> list[np.ndarray]: ...  # one batched pass; [n_tokens_i, hidden] each
    def expand_prompt(self, text: str, images: list) -> str: ...
    def positions(self, ids: np.ndarray, images: list) -> tuple[np.ndarray, int]: ...


class Model:
    """A ready-to-run model. Create it with `vlm.load`."""

    def __init__(self, decoder: LlamaModel, tokenizer: Tokenizer, family: VisionFamily | None = None,
                 context: int = 4096, prefill_chunk: int = 256, info: dict | None = None, kv_cache: str = "f16"):
        if context < 16:
            raise VlmError(f"context must be at least 16 tokens, got {context}")
        if prefill_chunk < 1:
            raise VlmError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        # One lock for everything that runs kernels or touches shared state (the kernels' thread
        # pool, the fused plans, the image cache), held per step so no stream can block the model.
        self.lock = threading.RLock()
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.family = family
        self.context = context
        self.prefill_chunk = prefill_chunk
        self.info = info or {}
        self.kv_cache = kv_cache
        self.session = self.new_session()
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # --- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of raw text (special tokens in the text are recognised)."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def render(self, prompt: str | Sequence[dict], n_images: int = 0) -> str:
        """The chat-templated text of a prompt (a string becomes one user turn, images first)."""
        if isinstance(prompt, str):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": content if n_images else prompt}]
        else:
            if not prompt:
                raise VlmError("the prompt is empty")
            messages = [dict(m) if isinstance(m, dict) else m for m in prompt]
        n_parts = 0
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise VlmError("each message must be a dict with 'role' and 'content'")
            if isinstance(m["content"], list):
                parts = m["content"]
                n_parts += sum(1 for p in parts if p.get("type") == "image")
                if self.family is None:  # text-only templates expect a string
                    if any(p.get("type") == "image" for p in parts):
                        raise VlmError("this model has no vision encoder; it cannot take images")
                    m["content"] = "".join(p.get("text", "") for p in parts)
        if n_parts != n_images:
            raise VlmError(f"the messages have {n_parts} image part(s) but {n_images} image(s) were given")
        return self.tokenizer.apply_chat_template(messages)

    # --- preparing a request -----------------------------------------------------------------

    def tokens(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, raw: bool = False,
               **image_options) -> tuple[np.ndarray, list]:
        """Token ids of a prompt with image placeholders expanded, and the preprocessed images.

        `prompt` is a string (one user turn, or tokenized as-is with raw=True), a list of chat
        messages, or a list of token ids (used exactly as given).
        """
        self._check_image_options(image_options)
        images = list(images or [])
        if images and self.family is None:
            raise VlmError("this model has no vision encoder; it cannot take images")
        processed = [self.preprocess(im, **image_options) for im in images]
        if isinstance(prompt, str) and (raw or not self.tokenizer.chat_template):
            text, add_bos = prompt, None
            if processed:
                text = self.family.image_token * len(processed) + text
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            if processed:
                raise VlmError("images cannot be combined with a prompt given as token ids")
            text, add_bos = None, False
        elif isinstance(prompt, (str, Sequence)):
            text, add_bos = self.render(prompt, len(processed)), False
        else:
            raise VlmError("prompt must be a string, a list of chat messages or a list of token ids")
        if text is not None:
            if processed:
                text = self.family.expand_prompt(text, processed)
            ids = np.asarray(self.tokenizer.encode(text, add_bos=add_bos), dtype=np.int64)
        else:
            ids = np.asarray(prompt, dtype=np.int64)
        if ids.size == 0:
            raise VlmError("the prompt is empty")
        if ids.min() < 0 or ids.max() >= self.decoder.config.vocab_size:
            raise VlmError(f"token id out of range 0..{self.decoder.config.vocab_size - 1}")
        return ids, processed

    def _check_image_options(self, options: dict) -> None:
        """Extra keyword arguments are the family's image options; anything else is a typo."""
        allowed = set(inspect.signature(self.family.preprocess).parameters) - {"image"} if self.family else set()
        unknown = sorted(set(options) - allowed)
        if unknown:
            takes = f"; this model's image options: {', '.join(sorted(allowed))}" if allowed else ""
            raise VlmError(f"unknown option {unknown[0]!r}{takes}")

    def preprocess(self, image, **image_options):
        """An image made ready for the vision encoder (an already preprocessed one is kept as is)."""
        if hasattr(image, "digest") and hasattr(image, "n_tokens"):
            return image
        return self.family.preprocess(load_image(image), **image_options)

    def encode_images(self, images: Sequence) -> None:
        """Encode images ahead of use, all new ones in one batched pass (they land in the image cache)."""
        self._encode_images([self.preprocess(im) for im in images])

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, raw: bool = False,
                **image_options) -> PromptInputs:
        """Everything the decoder needs for a prompt: ids, positions, image embeddings, cache keys."""
        ids, processed = self.tokens(prompt, images, raw, **image_options)
        if ids.size >= self.context:
            raise VlmError(f"the prompt is {ids.size} tokens but the context holds {self.context}; "
                           "shorten it or load the model with a larger context")
        keys: list = ids.tolist()
        if not processed:
            return PromptInputs(ids, np.arange(ids.size, dtype=np.int64), 0, keys)

        rows = np.flatnonzero(ids == self.family.image_token_id)
        expected = sum(p.n_tokens for p in processed)
        if rows.size != expected:
            raise VlmError(f"prompt has {rows.size} image tokens but the images need {expected}")
        t0 = time.perf_counter()
        embeds, encoded = self._encode_images(processed)
        vision_s = time.perf_counter() - t0
        k = 0
        for p in processed:
            for j in range(p.n_tokens):
                keys[rows[k]] = (p.digest, j)
                k += 1
        positions, rope_delta = self.family.positions(ids, processed)
        return PromptInputs(ids, positions, rope_delta, keys, np.concatenate(embeds), rows, len(processed), encoded,
                            vision_s)

    def _encode_images(self, processed: list) -> tuple[list[np.ndarray], int]:
        """Embeddings of each image (new ones through the encoder together, in one batch) and
        how many were encoded."""
        with self.lock:  # the image cache is shared, and the encoder runs the kernels
            todo = [p for p in processed if p.digest not in self._image_cache]
            unique = list({p.digest: p for p in todo}.values())
            if unique:
                for p, e in zip(unique, self.family.encode(unique), strict=True):
                    self._image_cache[p.digest] = e
            out = []
            for p in processed:
                self._image_cache.move_to_end(p.digest)
                out.append(self._image_cache[p.digest])
            while len(self._image_cache) > IMAGE_CACHE_ENTRIES:
                self._image_cache.popitem(last=False)
            return out, len(unique)

    # --- running the decoder -----------------------------------------------------------------

    def new_session(self, context: int | None = None) -> Session:
        """A sequence of its own (a KV cache and its bookkeeping) sharing this model's weights.

        `generate(..., session=s)` and `logits(..., session=s)` run in it; without one they use
        the model's default session (`model.session`).
        """
        context = self.context if context is None else context
        if not isinstance(context, int) or context < 16:
            raise VlmError(f"context must be at least 16 tokens, got {context}")
        return Session(self.decoder, context, self.kv_cache, self.prefill_chunk, self.lock)

    @property
    def cache(self):
        """The default session's KV cache."""
        return self.session.cache

    def logits(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, raw: bool = False,
               session: Session | None = None, **image_options) -> np.ndarray:
        """Float32 logits [n_tokens, vocab] for every prompt position, through the generate path."""
        inputs = self.prepare(prompt, images, raw=raw, **image_options)
        return (session or self.session).prefill(inputs, all_logits=True)[0]

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is prefilled from scratch)."""
        self.session.reset()

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                 stream: bool = False, raw: bool = False, session: Session | None = None,
                 **image_options) -> GenerationResult | TextStream:
        """Generate a continuation of `prompt` (a string, chat messages or token ids).

        Returns a `GenerationResult` (.text, .tokens, .stats), or with stream=True a `TextStream`
        that yields text pieces and holds the result once exhausted. temperature 0 is greedy.
        Runs in `session` (default: the model's own); calls from several threads, or several
        open streams, may share one session: each finds its own history again when another
        call used the session in between.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed))
        t0 = time.perf_counter()
        inputs = self.prepare(prompt, images, raw=raw, **image_options)
        result = GenerationResult("", [], GenerationStats(
            prompt_tokens=int(inputs.ids.size), images=inputs.images, images_encoded=inputs.images_encoded,
            image_tokens=int(inputs.image_rows.size), vision_encode_s=inputs.vision_encode_s))
        pieces = self._run(session or self.session, inputs, sampler, max_new_tokens, list(stop), result, t0)
        if stream:
            return TextStream(pieces, result)
        for _ in pieces:
            pass
        return result

    def _run(self, session: Session, inputs: PromptInputs, sampler: Sampler, max_new_tokens: int,
             stop: list[str], result: GenerationResult, t0: float) -> Iterator[str]:
        stats = result.stats
        stats.finish_reason = "interrupted"  # until the loop ends on its own
        detok = StreamDecoder(self.tokenizer, stop)
        eos = self.tokenizer.eos_ids
        history = inputs.ids.tolist()
        n_prompt = len(history)
        t_prefill = t_decode = time.perf_counter()
        try:
            with session.lock:
                logits, stats.cached_tokens = session.prefill(inputs)
                seen = session.version  # the session as this stream left it
            t_decode = time.perf_counter()
            stats.prefill_s = t_decode - t_prefill
            stats.ttft_s = t_decode - t0
            while True:
                token = sampler(logits, history)
                if token in eos:
                    stats.finish_reason = "stop"
                    break
                result.tokens.append(token)
                history.append(token)
                piece = detok.push(token)
                if piece:
                    yield piece
                if detok.stopped:
                    stats.finish_reason = "stop"
                    break
                if len(result.tokens) >= max_new_tokens or len(history) > session.context:  # the token would not fit
                    stats.finish_reason = "length"
                    break
                with session.lock:
                    if session.version == seen:
                        logits = session.step(token)
                    else:  # another call used the session since our last step
                        logits = session.resume(inputs, history[n_prompt:])
                    seen = session.version
                stats.decode_steps += 1
            if not detok.stopped:
                tail = detok.flush()
                if tail:
                    yield tail
        finally:
            stats.decode_s = time.perf_counter() - t_decode if stats.decode_steps else 0.0
            stats.generated_tokens = len(result.tokens)
            stats.peak_memory_mb = peak_memory_mb()
            result.text = detok.text

    def set_threads(self, threads: int | None) -> None:
        kernels.set_threads(threads)
