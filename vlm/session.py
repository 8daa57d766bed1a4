"""A decoding session: one KV cache, what each cached position holds, and the stepping API.

A `Session` is the only thing that writes a KV cache. It keeps, next to the cache, the content
of every cached position (a token id, or an image digest and row), which is what prefix reuse
compares, and the rope offset of the prompt it holds. Every call that runs kernels holds the
model's lock for one step (one prefill or one decode step), never across a whole generation,
so an abandoned stream holds nothing. `version` is bumped on every change: a generation
stream that finds it moved since its own last step knows someone else used the session and
restores its history (`resume`) before going on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from vlm.errors import VlmError
from vlm.models.llama import LlamaModel

KV_CACHE_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass
class PromptInputs:
    """A prompt made ready for the decoder."""

    ids: np.ndarray  # int64 [n]
    positions: np.ndarray  # [n], or [3, n] for M-RoPE
    rope_delta: int  # decode position = cache index + rope_delta
    keys: list  # what each position holds, for prefix reuse: token id or (image digest, index)
    image_embeds: np.ndarray | None = None  # [n_image_tokens, hidden] in prompt order
    image_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    images: int = 0
    images_encoded: int = 0  # images that went through the encoder (others came from the image cache)
    vision_encode_s: float = 0.0

    @classmethod
    def from_ids(cls, ids) -> PromptInputs:
        """Plain text token ids at positions 0..n-1."""
        ids = np.asarray(ids, dtype=np.int64)
        return cls(ids, np.arange(ids.size, dtype=np.int64), 0, ids.tolist())


class Session:
    """One sequence's KV cache and its bookkeeping; create it with `Model.new_session`.

        session = model.new_session()
        logits, reused = session.prefill(model.prepare("Hello"))
        logits = session.step(int(logits.argmax()))
    """

    def __init__(self, decoder: LlamaModel, context: int, kv_cache: str = "f16", prefill_chunk: int = 256,
                 lock: threading.RLock | None = None):
        if kv_cache not in KV_CACHE_DTYPES:
            raise VlmError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache!r}")
        self.decoder = decoder
        self.context = context
        self.prefill_chunk = prefill_chunk
        self.lock = lock or threading.RLock()
        self.cache = decoder.new_cache(context, KV_CACHE_DTYPES[kv_cache])
        self.rope_delta = 0  # of the prompt the cache holds
        self.version = 0  # bumped on every change to the cache
        self._held: list = []  # content of each cached position (rows past it are stale)

    @property
    def length(self) -> int:
        """Positions the cache holds."""
        return len(self._held)

    def held(self) -> tuple:
        """What each cached position holds (token id, or (image digest, row))."""
        return tuple(self._held)

    def reusable_prefix(self, keys: list) -> int:
        """How many leading positions of `keys` are already cached. At least two are left to run:
        a chunk of one query takes the decode step's attention kernel, which sums in another
        order than the prompt kernel (attention.c), and the reused prompt's logits would then
        differ in the last bits from a fresh prefill's."""
        n = 0
        limit = min(len(self._held), len(keys) - 2)
        while n < limit and self._held[n] == keys[n]:
            n += 1
        return n

    def reset(self) -> None:
        """Forget the cached positions (the next prompt is prefilled from scratch)."""
        with self.lock:
            self.version += 1
            self._held.clear()

    def prefill(self, inputs: PromptInputs, all_logits: bool = False) -> tuple[np.ndarray, int]:
        """Run a prompt through the decoder in chunks, reusing the cached prefix.

        Returns the logits (every position if `all_logits`, else only the last) and how many
        positions were reused from the cache. The bookkeeping grows only after a chunk's rows are
        written, so an exception leaves it describing exactly the valid rows.
        """
        with self.lock:
            *_, last = self.prefill_chunks(inputs, all_logits)
            return last

    def prefill_chunks(self, inputs: PromptInputs, all_logits: bool = False) -> Iterator[tuple[np.ndarray | None, int]]:
        """`prefill` one chunk per iteration, the lock held per chunk: yields (None, reused)
        after each chunk but the last, then (logits, reused). A server interleaves these with
        the decode steps of running sequences, so a long prompt does not stall them."""
        n = inputs.ids.size
        if n == 0:
            raise VlmError("the prompt is empty")
        if n >= self.context:
            raise VlmError(f"the prompt is {n} tokens but the context holds {self.context}; "
                           "shorten it or load the model with a larger context")
        decoder = self.decoder
        with self.lock:
            self.version += 1
            start = 0 if all_logits else self.reusable_prefix(inputs.keys)
            del self._held[start:]
            self.rope_delta = inputs.rope_delta
        out = np.empty((n, decoder.config.vocab_size), dtype=np.float32) if all_logits else None
        a = start
        while a < n:
            b = min(n, a + self.prefill_chunk)
            if b == n - 1:  # no chunk of one query after this one (see reusable_prefix)
                b = n
            with self.lock:
                self.version += 1
                if len(self._held) != a:
                    raise VlmError("the session was used by another call during this prefill")
                x = decoder.embed_tokens(inputs.ids[a:b])
                if inputs.image_embeds is not None:
                    sel = (inputs.image_rows >= a) & (inputs.image_rows < b)
                    x[inputs.image_rows[sel] - a] = inputs.image_embeds[sel]
                h = decoder.forward(x, inputs.positions[..., a:b], self.cache, a)
                self._held.extend(inputs.keys[a:b])
                if all_logits:
                    out[a:b] = decoder.lm_head(h)
                elif b == n:
                    out = decoder.lm_head(h[-1:])[0]
            yield (out if b == n else None), start
            a = b

    def step(self, token: int) -> np.ndarray:
        """Feed one token at the next cache position; returns the next-token logits."""
        return step_together([self], [token])[0]

    def resume(self, inputs: PromptInputs, tokens: list[int]) -> np.ndarray:
        """Make the cache hold `inputs` followed by `tokens` again; the logits after the last one.

        For a stream whose session was used by someone else between two of its steps. The
        prompt goes through `prefill` (reusing what still matches); the generated tokens are
        stepped one by one, as they were the first time, so the logits are the very same.
        """
        with self.lock:
            full = inputs.keys + tokens
            reused = self.reusable_prefix(full)
            if reused < len(inputs.keys):
                logits, _ = self.prefill(inputs)
                done = 0
            else:  # the whole prompt is still cached: only generated tokens are missing
                self.version += 1
                del self._held[reused:]
                self.rope_delta = inputs.rope_delta
                done = reused - len(inputs.keys)
            for t in tokens[done:]:
                logits = self.step(t)
            return logits


def step_together(sessions: Sequence[Session], tokens: Sequence[int]) -> np.ndarray:
    """Feed tokens[r] to sessions[r] at its next position, all in one batched decode step (the
    weights are read once for every session); returns the next-token logits [B, vocab].

    Each row gets exactly the logits `sessions[r].step(tokens[r])` alone would give. The
    sessions must be distinct and share one decoder (and its lock).
    """
    first = sessions[0] if sessions else None
    if (first is None or len({id(s) for s in sessions}) != len(sessions)
            or any(s.decoder is not first.decoder or s.lock is not first.lock for s in sessions)):
        raise VlmError("step_together takes one or more distinct sessions of one model")
    decoder = first.decoder
    with first.lock:
        positions, starts = [], []
        for s in sessions:
            pos = len(s._held)
            if pos >= s.context:
                raise VlmError(f"the context of {s.context} tokens is full")
            starts.append(pos)
            positions.append(np.array([pos + s.rope_delta], dtype=np.int64))
        for s in sessions:
            s.version += 1
        h = decoder.decode_batch(decoder.embed_tokens(np.asarray(tokens, dtype=np.int64)), positions,
                                 [s.cache for s in sessions], starts)
        for s, t in zip(sessions, tokens, strict=True):
            s._held.append(int(t))
        return decoder.head(h)
