"""`vlm serve`: an OpenAI-compatible HTTP server whose parallel sequences decode in batched steps.

    vlm serve -m smollm2-135m --parallel 4            # then point any OpenAI client at
                                                      # http://127.0.0.1:8080/v1

HTTP stack: the standard library's `ThreadingHTTPServer` (one thread per connection), as
mlx-lm's server does. The protocol surface is small (JSON bodies, server-sent events) and all the
work happens in the scheduler thread, so an ASGI stack (fastapi, uvicorn, pydantic...) would add
four runtime dependencies and buy nothing here; vlm keeps numpy as its only hard one.

Scheduling. One thread, the scheduler, runs the model; it owns `--parallel` N slots. A slot is
a `Session` (a KV cache and what it holds, which is what prefix reuse compares) plus the
request decoding in it, if any. HTTP threads only parse and validate a request and prepare its
prompt (tokens, images encoded), then wait for its text. Each turn of the scheduler:

1. admits waiting requests, each to the free slot whose cached prefix matches it longest
   (llama-server's rule: a follow-up turn of a chat finds its conversation's cache again);
2. prefills up to one chunk's worth of prompt tokens (`prefill_chunk`), over the newly admitted
   requests in order: a long prompt is spread over turns, so running streams stall for at
   most one chunk, and many short prompts start in one turn;
3. decodes one token of every running sequence in ONE batched step (`step_together`: the
   weights are read once for all of them; each sequence still gets exactly the tokens it would
   get alone);
4. hands each request its new text. A request whose client went away is dropped at the next
   turn and its slot is free again.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import select
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlm.errors import VlmError
from vlm.generation import Decoding, SamplingParams
from vlm.runtime import Model
from vlm.session import Session, step_together

MAX_BODY_BYTES = 32 << 20  # a request body (base64 images included)
REMOTE_MEDIA_MAX_BYTES = 20 << 20  # an image fetched with --allow-remote-media
REMOTE_MEDIA_TIMEOUT_S = 10.0
# A client silent this long (mid-request, or between requests on a kept-alive connection) is
# dropped, as llama-server does: otherwise each such connection holds a thread for good.
CONNECTION_TIMEOUT_S = 600.0
IDLE_WAIT_S = 0.05  # how often an idle scheduler and a waiting handler look up (stop, disconnects)

# Request fields read as given; others that clients commonly send are accepted only with the value
# that asks for nothing (IGNORED); any other field is a 400, as OpenAI's API answers.
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "seed", "stop", "stream", "stream_options", "n")
IGNORED = {"user": None, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False,
           "parallel_tool_calls": None, "tool_choice": "none", "response_format": {"type": "text"}}
UNSUPPORTED = ("tools", "functions", "function_call")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- requests --------------------------------------------------------------------------------


@dataclass
class Job:
    """One request between its HTTP thread and the scheduler."""

    seq: Decoding
    t0: float  # when the request arrived
    events: queue.Queue = field(default_factory=queue.Queue)  # ("text", str), ("done", None) or ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Slot:
    """One of the server's N sequences: a Session, and the job decoding in it (None: free)."""

    session: Session
    job: Job | None = None
    prefill: Iterator | None = None  # the prompt's remaining chunks, while it is prefilled
    t_prefill: float = 0.0


class Scheduler:
    """Runs every admitted request on the model: see the module docstring."""

    def __init__(self, model: Model, parallel: int):
        if parallel < 1:
            raise VlmError(f"--parallel must be at least 1, got {parallel}")
        self.model = model
        self.slots = [Slot(model.new_session()) for _ in range(parallel)]
        self.waiting: list[Job] = []
        self.wakeup = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="vlm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wakeup:
            if self.stopping:
                raise ApiError(503, "the server is shutting down")
            self.waiting.append(job)
            self.wakeup.notify()

    def busy_slots(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def stop(self) -> None:
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not self.stopping and not self.waiting and not self.busy_slots():
                    self.wakeup.wait(IDLE_WAIT_S)
                if self.stopping:
                    break
                self._admit()
            try:
                self._turn()
            except Exception as e:  # a bug, not a bad request (those fail in their HTTP thread)
                for slot in self.slots:
                    if slot.job is not None:
                        self._release(slot, ("error", f"internal error: {e}"))
                        slot.session.reset()
        for slot in self.slots:  # shutting down: every request still here ends now
            if slot.job is not None:
                self._release(slot, ("error", "the server is shutting down"))
        for job in self.waiting:
            job.events.put(("error", "the server is shutting down"))

    def _admit(self) -> None:
        """Waiting jobs to free slots, each to the one whose cache holds its longest prefix."""
        while self.waiting:
            job = self.waiting[0]
            free = [slot for slot in self.slots if slot.job is None]
            if not free:
                return
            self.waiting.pop(0)
            if job.cancelled.is_set():
                continue
            slot = max(free, key=lambda s: s.session.reusable_prefix(job.seq.inputs.keys))
            slot.job, slot.t_prefill = job, time.perf_counter()
            slot.prefill = slot.session.prefill_chunks(job.seq.inputs)

    def _turn(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._release(slot, None)
        budget = self.model.prefill_chunk  # prompt tokens per turn, over requests in the order admitted
        for slot in sorted((s for s in self.slots if s.prefill is not None), key=lambda s: s.t_prefill):
            if budget <= 0:
                break
            before = slot.session.length
            try:
                logits, cached = next(slot.prefill)
            except VlmError as e:
                self._release(slot, ("error", str(e)))
                continue
            budget -= slot.session.length - before
            if logits is not None:
                slot.prefill = None
                slot.job.seq.prefilled(slot.session, logits, cached, slot.job.t0, slot.t_prefill)
                self._advance(slot)
        decoding = [slot for slot in self.slots if slot.job is not None and slot.prefill is None]
        if decoding:
            logits = step_together([slot.session for slot in decoding], [slot.job.seq.token for slot in decoding])
            for slot, row in zip(decoding, logits, strict=True):
                slot.job.seq.stepped(row)
                self._advance(slot)

    def _advance(self, slot: Slot) -> None:
        """Sample the slot's next token and pass on its text; free the slot when it is done."""
        seq = slot.job.seq
        try:
            text = seq.advance()
        except VlmError as e:  # NaN logits: this request fails, the others go on
            self._release(slot, ("error", str(e)))
            return
        if text:
            slot.job.events.put(("text", text))
        if seq.done:
            self._release(slot, ("done", None))

    def _release(self, slot: Slot, event: tuple | None) -> None:
        slot.job.seq.close()
        if slot.prefill is not None:
            slot.prefill.close()
        if event is not None:
            slot.job.events.put(event)
        slot.job, slot.prefill = None, None


# --- the OpenAI API ----------------------------------------------------------------------------


def _number(body: dict, name: str, kind: type, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be between {low} and {high}", name)
    return kind(value)


def sampling_request(body: dict, context: int) -> dict:
    """The sampling fields of a request as `Model.start` arguments (checked)."""
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported: vlm serves plain text completions", name)
    known = {"model", "messages", "prompt", *SAMPLING_FIELDS, *UNSUPPORTED, *IGNORED}
    for name in body:
        if name not in known:
            raise ApiError(400, f"unrecognized request argument: {name}", name)
        if name in IGNORED and body[name] not in (None, IGNORED[name]) and IGNORED[name] is not None:
            raise ApiError(400, f"'{name}' is not supported with the value {body[name]!r}", name)
    if _number(body, "n", int, 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    try:
        sampling = SamplingParams(_number(body, "temperature", float, 1.0, 0, 2), _number(body, "top_k", int, 0, 0),
                                  _number(body, "top_p", float, 1.0, 0, 1), _number(body, "min_p", float, 0.0, 0, 1),
                                  _number(body, "repetition_penalty", float, 1.0, 0), _number(body, "seed", int, None))
    except VlmError as e:
        raise ApiError(400, str(e)) from None
    return dict(max_new_tokens=_number(body, limit, int, context, 1), sampling=sampling, stop=stop)


def load_media(url: str, media_dir: Path | None, allow_remote: bool) -> bytes | str:
    """An image_url: a data: URI, a file under --media-dir, or (--allow-remote-media) http(s)."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(400, "image data: URIs must be base64", "messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "an image data: URI is not valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(400, "remote images are off; start the server with --allow-remote-media", "messages")
        try:
            with urllib.request.urlopen(url, timeout=REMOTE_MEDIA_TIMEOUT_S) as r:  # noqa: S310 (http(s) only)
                data = r.read(REMOTE_MEDIA_MAX_BYTES + 1)
        except OSError as e:
            raise ApiError(400, f"could not fetch the image {url}: {e}", "messages") from None
        if len(data) > REMOTE_MEDIA_MAX_BYTES:
            raise ApiError(413, f"the image {url} is over {REMOTE_MEDIA_MAX_BYTES >> 20} MiB", "messages")
        return data
    path = Path(url.removeprefix("file://"))
    if media_dir is None:
        raise ApiError(400, "local image paths are off; start the server with --media-dir", "messages")
    resolved = (media_dir / path).resolve()
    if not resolved.is_relative_to(media_dir) or not resolved.is_file():
        raise ApiError(400, f"no image {url} under the media folder", "messages")
    return str(resolved)


def chat_messages(body: dict, media_dir: Path | None, allow_remote: bool) -> tuple[list[dict], list]:
    """OpenAI chat messages as vlm's (image parts in place) and the images in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, "each message needs a role: system, user or assistant", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": role, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise ApiError(400, "a message's content must be a string or a list of parts", "messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise ApiError(400, "an image_url part needs a url", "messages")
                images.append(load_media(url, media_dir, allow_remote))
                parts.append({"type": "image"})
            else:
                raise ApiError(400, "content parts must be text or image_url", "messages")
        out.append({"role": role, "content": parts})
    return out, images


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or a list of token ids", "prompt")


def usage(seq: Decoding) -> dict:
    s = seq.result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def timings(seq: Decoding) -> dict:
    """vlm's stats of a request, as llama-server's `timings` field carries its own."""
    s = seq.result.stats
    return {"prompt_n": s.prompt_tokens - s.cached_tokens, "cached_n": s.cached_tokens,
            "prompt_ms": 1e3 * s.prefill_s, "prompt_per_second": s.prefill_tps, "predicted_n": s.generated_tokens,
            "predicted_ms": 1e3 * s.decode_s, "predicted_per_second": s.decode_tps,
            "vision_s": s.vision_encode_s, "images": s.images, "ttft_ms": 1e3 * s.ttft_s}


# --- HTTP ----------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    """The HTTP server with its model (loaded in the background: /health says 503 until then)."""

    daemon_threads = True  # a stalled client never holds up shutdown

    def __init__(self, address: tuple[str, int], load, parallel: int = 1, api_key: str | None = None,
                 media_dir: str | Path | None = None, allow_remote_media: bool = False,
                 max_body: int = MAX_BODY_BYTES, connection_timeout_s: float = CONNECTION_TIMEOUT_S, log=None):
        super().__init__(address, Handler)
        self.log = log or (lambda message: None)
        self.api_key, self.allow_remote_media, self.max_body = api_key, allow_remote_media, max_body
        self.connection_timeout_s = connection_timeout_s
        self.media_dir = Path(media_dir).resolve() if media_dir else None
        self.model: Model | None = None
        self.scheduler: Scheduler | None = None
        self.model_id = "vlm"
        self.load_error: str | None = None
        self.created = int(time.time())
        self.state = threading.Lock()  # a load that ends after close() starts no scheduler
        self.closed = False
        self.loader = threading.Thread(target=self._load, args=(load, parallel), name="vlm-load", daemon=True)
        self.loader.start()

    def _load(self, load, parallel: int) -> None:
        try:
            model = load()
            with self.state:
                if self.closed:
                    return
                self.scheduler = Scheduler(model, parallel)
                self.model_id = Path(str(model.info.get("path", "vlm"))).name or "vlm"
                self.model = model
            self.log(f"vlm: ready: {self.model_id}")
        except VlmError as e:
            self.load_error = str(e)
            self.log(f"vlm: error: {e}")

    def close(self) -> None:
        """Stop serving: the scheduler ends every request still running, then the socket closes."""
        self.shutdown()
        with self.state:
            self.closed = True
        if self.scheduler is not None:
            self.scheduler.stop()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "vlm"

    def setup(self) -> None:
        self.timeout = self.server.connection_timeout_s  # the base class puts it on the socket
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per request would drown the terminal; errors reach the client

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def _dispatch(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        self._body_read = False  # one handler serves every request of a kept-alive connection
        try:
            if path not in routes:
                other = "POST" if self.command == "GET" else "GET"
                raise ApiError(405 if path in ROUTES[other] else 404, f"no route {self.command} {path}")
            if path != "/health":
                self._check_key()
            routes[path]()
        except ApiError as e:
            self._drain()
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client is gone or stalled
            self.close_connection = True
        except Exception as e:  # a bug: still an answer in the API's shape, and the server goes on
            self.close_connection = True
            self._json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body())

    def _check_key(self) -> None:
        key = self.server.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def _ready(self) -> Model:
        if self.server.load_error:
            raise ApiError(503, f"the model failed to load: {self.server.load_error}")
        if self.server.model is None:
            raise ApiError(503, "the model is loading")
        return self.server.model

    def _drain(self) -> None:
        """Read an unread body away before answering: a client still sending it would otherwise
        see the connection reset instead of the answer. Past 4x the limit, hang up instead."""
        length = self.headers.get("Content-Length", "")
        if self._body_read or not length.isdigit():
            return
        left = int(length)
        if left > 4 * self.server.max_body:
            self.close_connection = True
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(400, "a request body with Content-Length is required")
        if int(length) > self.server.max_body:
            raise ApiError(413, f"the request body is over {self.server.max_body} bytes")
        raw = self.rfile.read(int(length))
        self._body_read = True
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # --- endpoints ---

    def _health(self) -> None:
        if self.server.model is None:
            self._ready()
        self._json(200, {"status": "ok", "slots_idle": len(self.server.scheduler.slots)
                         - self.server.scheduler.busy_slots(), "slots_processing": self.server.scheduler.busy_slots()})

    def _models(self) -> None:
        self._ready()
        self._json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                     "created": self.server.created, "owned_by": "vlm"}]})

    def _chat(self) -> None:
        body = self._body()
        model = self._ready()
        options = sampling_request(body, model.context)
        messages, images = chat_messages(body, self.server.media_dir, self.server.allow_remote_media)
        self._complete(body, model, messages, images, False, options, "chat.completion")

    def _completions(self) -> None:
        body = self._body()
        model = self._ready()
        options = sampling_request(body, model.context)
        self._complete(body, model, completion_prompt(body), None, True, options, "text_completion")

    def _complete(self, body: dict, model: Model, prompt, images, raw: bool, options: dict, kind: str) -> None:
        t0 = time.perf_counter()
        try:
            seq = model.start(prompt, images, raw=raw, **options)
        except VlmError as e:
            raise ApiError(400, str(e)) from None
        job = Job(seq, t0)
        self.server.scheduler.submit(job)
        stream_options = body.get("stream_options") or {}
        reply = Reply(kind, self.server.model_id)
        try:
            if body.get("stream"):
                self._stream(job, reply, bool(stream_options.get("include_usage")))
            else:
                text = "".join(self._events(job))
                self._json(200, reply.whole(text, seq))
        finally:
            job.cancelled.set()  # a no-op once done; frees the slot when the client went away

    def _events(self, job: Job) -> Iterator[str]:
        """The job's text as it comes; raises ApiError on a failure, ConnectionResetError when
        the client hung up (checked while waiting, so its slot is freed at once)."""
        while True:
            try:
                kind, value = job.events.get(timeout=IDLE_WAIT_S)
            except queue.Empty:
                if self._client_gone():
                    raise ConnectionResetError("the client went away") from None
                continue
            if kind == "text":
                yield value
            elif kind == "done":
                return
            else:
                raise ApiError(503 if "shutting down" in value else 500, value)

    def _client_gone(self) -> bool:
        """The client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, job: Job, reply: Reply, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        self._send_event(reply.chunk("", include_usage, first=True))
        try:
            for text in self._events(job):
                self._send_event(reply.chunk(text, include_usage))
        except ApiError as e:  # the headers are sent: the error goes as an event, as OpenAI does
            self._send_event(e.body())
        else:
            self._send_event(reply.chunk("", include_usage, finish=job.seq))
            if include_usage:
                self._send_event(reply.usage_chunk(job.seq))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _send_event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


ROUTES = {"GET": ("/health", "/v1/models"), "POST": ("/v1/chat/completions", "/v1/completions")}


class Reply:
    """Response bodies and stream chunks of one request, shaped as OpenAI's."""

    def __init__(self, kind: str, model_id: str):
        self.kind, self.model = kind, model_id
        self.chat = kind == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "vlm"}

    def whole(self, text: str, seq: Decoding) -> dict:
        reason = finish_reason(seq)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if self.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {**self._head(self.kind), "choices": [choice], "usage": usage(seq), "timings": timings(seq)}

    def chunk(self, text: str, include_usage: bool, first: bool = False, finish: Decoding | None = None) -> dict:
        reason = finish_reason(finish) if finish is not None else None
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if finish is not None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
        if include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        if finish is not None:
            body["timings"] = timings(finish)
        return body

    def usage_chunk(self, seq: Decoding) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(seq)}


def finish_reason(seq: Decoding) -> str:
    return "length" if seq.result.stats.finish_reason == "length" else "stop"


def serve(load, host: str = "127.0.0.1", port: int = 8080, parallel: int = 1, api_key: str | None = None,
          media_dir: str | None = None, allow_remote_media: bool = False,
          connection_timeout_s: float = CONNECTION_TIMEOUT_S, log=print) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down cleanly (`load`: returns the Model)."""
    import signal

    def terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        server = Server((host, port), load, parallel, api_key, media_dir, allow_remote_media,
                        connection_timeout_s=connection_timeout_s, log=log)
    except OSError as e:
        raise VlmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    previous = signal.signal(signal.SIGTERM, terminate)
    log(f"vlm: serving http://{host}:{server.server_address[1]}/v1 with {parallel} slot(s); loading the model")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log("vlm: shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
