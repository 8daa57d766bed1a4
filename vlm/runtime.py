"""The runtime: a loaded model (tokenizer + decoder + a vision family) and its request path.

A request reads top to bottom: render the chat template -> segments (text ids, image slots;
vlm/prompt.py) -> `prepare` (image embeddings, cache keys, positions) -> a `Session` prefills it
in chunks, reusing the cached prefix -> the generation loop (vlm/generation.py) samples and steps
one token at a time and streams text. Families plug in through `vlm.models.family.VisionFamily`;
see docs/architecture.md.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from vlm import kernels
from vlm.errors import VlmError
from vlm.generation import (
    Decoding,
    GenerationResult,
    Sampler,
    SamplingParams,
    TextStream,
    check_logits,
    generation_loop,
    stop_strings,
)
from vlm.image import ImageInput, image_errors, image_list, load_image
from vlm.models import ProcessedImage, VisionFamily
from vlm.models.llama import LlamaModel
from vlm.prompt import (
    ImageSegment,
    Segment,
    TextSegment,
    image_rows,
    prompt_ids,
    prompt_keys,
    segment_text,
)
from vlm.session import PromptInputs, Session, step_together
from vlm.tokenizer import Tokenizer, check_message

Prompt = str | Sequence[dict] | Sequence[int]

# Decoded image embeddings kept for reuse (a chat shows the same image every turn).
IMAGE_CACHE_ENTRIES = 16


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
            check_message(m)
            if isinstance(m["content"], list):
                parts = m["content"]
                n_parts += sum(1 for p in parts if p.get("type") == "image")
                if self.family is None and any(p.get("type") == "image" for p in parts):
                    raise VlmError("this model has no vision encoder; it cannot take images")
                if not self._template_places_images:  # text-only templates expect a string
                    image = self.family.image_markup or self.family.image_token if self.family else ""
                    m["content"] = "".join(image if p.get("type") == "image" else p.get("text", "") for p in parts)
        if n_parts != n_images:
            raise VlmError(f"the messages have {n_parts} image part(s) but {n_images} image(s) were given")
        return self.tokenizer.apply_chat_template(messages)

    @functools.cached_property
    def _template_places_images(self) -> bool:
        """Whether the chat template writes the family's placeholder for an image part. A llama.cpp
        text GGUF's may not (a text model's template): then, as llama.cpp's mtmd does, each image
        is written into the message's text as the projector's markup."""
        if self.family is None:
            return False
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        try:
            return self.family.image_token in self.tokenizer.apply_chat_template(probe)
        except VlmError:
            return False

    # --- preparing a request -----------------------------------------------------------------

    def segments(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, raw: bool = False,
                 **image_options) -> tuple[list[Segment], list]:
        """A prompt as segments (text token ids, image rows), and its preprocessed images.

        `prompt` is a string (one user turn, or tokenized as-is with raw=True), a list of chat
        messages, or a list of token ids (used exactly as given).
        """
        self._check_image_options(image_options)
        images = image_list(images)
        if images and self.family is None:
            raise VlmError("this model has no vision encoder; it cannot take images")
        processed = [self.preprocess(im, **image_options) for im in images]
        if isinstance(prompt, str) and (raw or not self.tokenizer.chat_template):
            text, add_bos = prompt, None
            if processed:  # no template to place them: the images go first
                text = self.family.image_token * len(processed) + text
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            if processed:
                raise VlmError("images cannot be combined with a prompt given as token ids")
            text, add_bos = None, False
        elif isinstance(prompt, (str, Sequence)):
            text, add_bos = self.render(prompt, len(processed)), False
        else:
            raise VlmError("prompt must be a string, a list of chat messages or a list of token ids")
        vocab = self.decoder.config.vocab_size
        out_of_range = VlmError(f"token id out of range 0..{vocab - 1}")
        if text is None:
            if not all(0 <= t < vocab for t in prompt):  # before int64: 2**64 would overflow it
                raise out_of_range
            segments: list[Segment] = [TextSegment(np.asarray(prompt, dtype=np.int64))]
        elif processed:
            f = self.family
            segments = segment_text(text, processed, f.image_token, f.image_slot, f.image_token_id,
                                    self.tokenizer.encode, add_bos)
        else:
            segments = [TextSegment(np.asarray(self.tokenizer.encode(text, add_bos=add_bos), dtype=np.int64))]
        text_ids = [s.ids for s in segments if isinstance(s, TextSegment) and s.ids.size]
        if not any(len(s) for s in segments):
            raise VlmError("the prompt is empty")
        if text_ids:
            every = np.concatenate(text_ids)
            if every.min() < 0 or every.max() >= vocab:  # a tokenizer with more tokens than the decoder
                raise out_of_range
        return segments, processed

    def _check_image_options(self, options: dict) -> None:
        """Extra keyword arguments are the family's image options; anything else is a typo."""
        allowed = set(self.family.image_options) if self.family else set()
        unknown = sorted(set(options) - allowed)
        if unknown:
            takes = f"; this model's image options: {', '.join(sorted(allowed))}" if allowed else ""
            raise VlmError(f"unknown option {unknown[0]!r}{takes}")

    def preprocess(self, image, **image_options):
        """An image made ready for the vision encoder (an already preprocessed one is kept as is)."""
        if isinstance(image, ProcessedImage):
            return image
        img = load_image(image)
        with image_errors():
            return self.family.preprocess(img, **image_options)

    def encode_images(self, images: Sequence) -> None:
        """Encode images ahead of use, all new ones in one batched pass (they land in the image cache)."""
        self._encode_images([self.preprocess(im) for im in images])

    def prepare(self, prompt: Prompt, images: Sequence[ImageInput] | None = None, raw: bool = False,
                **image_options) -> PromptInputs:
        """Everything the decoder needs for a prompt: ids, positions, image embeddings, cache keys."""
        segments, processed = self.segments(prompt, images, raw, **image_options)
        ids, keys = prompt_ids(segments), prompt_keys(segments)
        if ids.size >= self.context:
            raise VlmError(f"the prompt is {ids.size} tokens but the context holds {self.context}; "
                           "shorten it or load the model with a larger context")
        if not processed:
            return PromptInputs(ids, np.arange(ids.size, dtype=np.int64), 0, keys)
        t0 = time.perf_counter()
        embeds, encoded = self._encode_images(processed)
        vision_s = time.perf_counter() - t0
        by_digest = {p.digest: e for p, e in zip(processed, embeds, strict=True)}
        runs = [s for s in segments if isinstance(s, ImageSegment)]
        if sum(s.rows for s in runs) != sum(e.shape[0] for e in embeds):  # a family's slot is wrong
            raise VlmError("the image slots' rows do not match the images' embedding rows")
        image_embeds = np.concatenate([by_digest[s.image.digest][s.start:s.start + s.rows] for s in runs])
        positions, rope_delta = self.family.positions(segments)
        return PromptInputs(ids, positions, rope_delta, keys, image_embeds, image_rows(segments), len(processed),
                            encoded, vision_s)

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
        return check_logits((session or self.session).prefill(inputs, all_logits=True)[0], 0)

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
        t0 = time.perf_counter()
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        seq = self.start(prompt, images, max_new_tokens, sampling, stop, raw, **image_options)
        pieces = generation_loop(session or self.session, seq, t0)
        if stream:
            return TextStream(pieces, seq.result)
        for _ in pieces:
            pass
        return seq.result

    def generate_batch(self, prompts: Sequence[Prompt], images: Sequence[Sequence[ImageInput] | None] | None = None,
                       max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = (), raw: bool = False, **image_options) -> list[GenerationResult]:
        """Generate a continuation of each prompt, decoding them together.

        Each prompt is prefilled in a session of its own; then every step decodes one token of
        every sequence still running in one batched pass (the weights are read once for all of
        them), and each sequence finishes on its own. `images`, if given, holds each prompt's
        images. Each result equals `generate(prompt, ...)` alone: greedy decoding gives the
        same tokens, and a seed the same draws. Stats' decode rate is per sequence.
        """
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise VlmError(f"{len(prompts)} prompts but {len(images)} image lists")
        sampling = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        running = []
        for prompt, imgs in zip(prompts, images, strict=True):
            t0 = time.perf_counter()
            seq = self.start(prompt, imgs, max_new_tokens, sampling, stop, raw, **image_options)
            seq.prefill(self.new_session(), t0)
            running.append(seq)
        results = [seq.result for seq in running]
        try:
            while running:
                for seq in running:
                    seq.advance()
                    if seq.done:
                        seq.close()
                running = [seq for seq in running if not seq.done]
                if running:
                    logits = step_together([seq.session for seq in running], [seq.token for seq in running])
                    for seq, row in zip(running, logits, strict=True):
                        seq.stepped(row)
        finally:
            for seq in running:
                seq.close()
        return results

    def start(self, prompt: Prompt, images: Sequence[ImageInput] | None, max_new_tokens: int,
              sampling: SamplingParams, stop: Sequence[str] = (), raw: bool = False, **image_options) -> Decoding:
        """A request made ready to decode (prompt prepared, images encoded): see `Decoding`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise VlmError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
        stop = stop_strings(stop)  # checked before any image is encoded
        inputs = self.prepare(prompt, images, raw=raw, **image_options)
        return Decoding(self.tokenizer, inputs, Sampler(sampling), max_new_tokens, stop)

    def set_threads(self, threads: int | None) -> None:
        kernels.set_threads(threads)

