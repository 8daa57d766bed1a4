"""The generation loop: sampling, stepping a session, streaming text, and what it cost."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from vlm.errors import VlmError
from vlm.session import PromptInputs, Session
from vlm.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(value):
                raise VlmError(f"invalid sampling setting: {name} must be a finite number, got {value!r:.40}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (_whole(self.top_k) and self.top_k >= 0, "top_k must be a whole number >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or (_whole(self.seed) and self.seed >= 0), "seed must be a whole number >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise VlmError(f"invalid sampling setting: {message}")


def _whole(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """The stop strings of a request: one string, a list of them, or None for none."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    try:
        stops = list(stop)
    except TypeError:
        stops = None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise VlmError(f"stop must be a string or a list of strings, got {stop!r:.60}")
    return stops


def check_logits(logits: np.ndarray, position: int) -> np.ndarray:
    """`logits` ([vocab] or [n, vocab] from `position` on) unless a value is NaN or infinite:
    then a VlmError, since corrupt weights or hyperparameters would otherwise print junk.
    One pass over each row, cheap next to the matmul that made it."""
    finite = np.isfinite(logits)
    if not finite.all():
        bad = 0 if logits.ndim == 1 else int(np.flatnonzero(~finite.all(axis=-1))[0])
        raise VlmError(f"the model produced NaN/inf logits at token {position + bad}: "
                       "the weights or hyperparameters are corrupt")
    return logits


class Sampler:
    """Applies repetition penalty, temperature, top-k, top-p and min-p, then draws a token."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = check_logits(np.asarray(logits, dtype=np.float32), len(history))
        if p.repetition_penalty != 1.0 and history:
            logits = logits.copy()  # the caller's logits stay as they were
            # The CTRL / transformers rule: shrink positive logits, grow negative ones.
            seen = np.unique(np.asarray(history))
            seen = seen[seen < logits.size]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.min_p > 0.0:
            probs[probs < p.min_p * probs.max()] = 0.0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, p.top_p * cum[-1])) + 1  # smallest set reaching top_p
            probs[order[cut:]] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class GenerationStats:
    """What one generation cost. Rates are tokens per second of wall time."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions reused from the KV cache
    generated_tokens: int = 0
    decode_steps: int = 0  # forward passes after prefill (the first token comes from prefill)
    ttft_s: float = 0.0  # request start to first token, including image encoding
    prefill_s: float = 0.0
    decode_s: float = 0.0
    images: int = 0
    images_encoded: int = 0  # the rest came from the image-embedding cache
    image_tokens: int = 0
    vision_encode_s: float = 0.0
    peak_memory_mb: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "interrupted"

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps)
        return d

    def summary(self) -> str:
        """The one-line report shown after an answer."""
        parts = [f"prompt {self.prompt_tokens} tok" + (f" ({self.cached_tokens} cached)" if self.cached_tokens else ""),
                 f"prefill {self.prefill_tps:.1f} tok/s", f"decode {self.decode_tps:.1f} tok/s",
                 f"first token {self.ttft_s:.2f} s"]
        if self.images_encoded:
            parts.append(f"vision {self.vision_encode_s:.2f} s ({self.images_encoded} img encoded)")
        if self.images:
            parts.append(f"{self.images} img = {self.image_tokens} tok")
        parts.append(f"peak {self.peak_memory_mb:.0f} MiB")
        return " | ".join(parts)


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    tokens: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class TextStream:
    """Iterator of text pieces; `.result` (text, tokens, stats) is complete once it is exhausted."""

    def __init__(self, pieces: Iterator[str], result: GenerationResult):
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    @property
    def stats(self) -> GenerationStats:
        return self.result.stats

    def close(self) -> None:
        """Stop generating early (the cache stays consistent)."""
        self._pieces.close()


class Decoding:
    """One sequence being generated: its prompt, sampler, stop rules, streamed text and stats.

    Driven from outside, one token at a time, so one sequence (`Model.generate`) or many
    decoded together (`Model.generate_batch`, the server's slots) run the same rules:
    `prefill(session)`, then repeatedly `advance()` (sample from the logits in hand; returns
    the text that became final) and, unless `done`, feed `token` to the session (alone or in a
    batched step) and hand the logits back with `stepped`. `close()` settles the stats.
    """

    def __init__(self, tokenizer: Tokenizer, inputs: PromptInputs, sampler: Sampler, max_new_tokens: int,
                 stop: list[str]):
        self.inputs, self.sampler, self.max_new_tokens = inputs, sampler, max_new_tokens
        self.detok = StreamDecoder(tokenizer, stop)
        self.eos = tokenizer.eos_ids
        self.history = inputs.ids.tolist()
        self.session: Session | None = None
        self.logits: np.ndarray | None = None
        self.token: int | None = None  # the token to feed next, once sampled
        self.done = False
        self.result = GenerationResult("", [], GenerationStats(
            prompt_tokens=int(inputs.ids.size), images=inputs.images, images_encoded=inputs.images_encoded,
            image_tokens=int(inputs.image_rows.size), vision_encode_s=inputs.vision_encode_s,
            finish_reason="interrupted"))  # until it ends on its own
        self._t_decode = 0.0

    @property
    def generated(self) -> list[int]:
        return self.result.tokens

    def prefill(self, session: Session, t0: float) -> None:
        """The prompt through `session` in one go (t0: when the request started)."""
        t = time.perf_counter()
        self.prefilled(session, *session.prefill(self.inputs), t0, t)

    def prefilled(self, session: Session, logits: np.ndarray, cached: int, t0: float, t_prefill: float) -> None:
        """The prompt is in `session` (prefilled from t_prefill on, `cached` positions reused)."""
        stats = self.result.stats
        self.session, self.logits, stats.cached_tokens = session, logits, cached
        self._t_decode = time.perf_counter()
        stats.prefill_s = self._t_decode - t_prefill
        stats.ttft_s = self._t_decode - t0

    def advance(self) -> str:
        """Sample the next token; returns the text it makes final (maybe empty). Sets `done`
        when the sequence ends (EOS, a stop string, max_new_tokens or a full context)."""
        token = self.sampler(self.logits, self.history)
        if token in self.eos:
            return self._finish("stop")
        self.result.tokens.append(token)
        self.history.append(token)
        piece = self.detok.push(token)
        if self.detok.stopped:
            self.done, self.result.stats.finish_reason = True, "stop"
            return piece
        if len(self.result.tokens) >= self.max_new_tokens or len(self.history) > self.session.context:
            return piece + self._finish("length")  # the token would not fit
        self.token = token
        return piece

    def stepped(self, logits: np.ndarray) -> None:
        """The logits after `token` was fed."""
        self.logits = logits
        self.result.stats.decode_steps += 1

    def _finish(self, reason: str) -> str:
        self.done, self.result.stats.finish_reason = True, reason
        return self.detok.flush()

    def close(self) -> None:
        """Settle the stats (called once the sequence ended or was abandoned)."""
        stats = self.result.stats
        stats.decode_s = time.perf_counter() - self._t_decode if stats.decode_steps else 0.0
        stats.generated_tokens = len(self.result.tokens)
        stats.peak_memory_mb = peak_memory_mb()
        self.result.text = self.detok.text


def generation_loop(session: Session, seq: Decoding, t0: float) -> Iterator[str]:
    """Prefill `seq`'s prompt in `session`, then sample and step until EOS, a stop string or a
    limit, yielding text pieces; `seq.result` is filled in as it goes (and when the stream is
    closed). t0: when the request started.

    The model's lock is taken per step, never across the stream. If another call used the session
    between two steps (another thread, another open stream), the stream restores its own
    history first (`Session.resume`), so it still produces exactly its solo output.
    """
    try:
        with session.lock:
            seq.prefill(session, t0)
            seen = session.version  # the session as this stream left it
        while True:
            piece = seq.advance()
            if piece:
                yield piece
            if seq.done:
                break
            with session.lock:
                # A moved version: another call used the session since our last step.
                seq.stepped(session.step(seq.token) if session.version == seen
                            else session.resume(seq.inputs, seq.generated))
                seen = session.version
    finally:
        seq.close()

