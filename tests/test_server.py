"""`vlm serve` through the official `openai` client and raw HTTP, on a free loopback port.

Greedy answers are compared with `Model.generate` in a fresh session: a slot whose cache is empty
computes exactly what generate does, and so does a slot that reuses a cached prompt prefix (a
prompt's rows are the same bits whatever chunk holds them). A reused prefix that holds a reply
written by decode steps may differ in the last bits; its reference is generate() after the
same reuse.
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import vlm
from vlm.server import Server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return vlm.load(smollm2_gguf, context=512)


class Running:
    """A Server serving from a thread, with clients for it."""

    def __init__(self, load, **options):
        self.server = Server(("127.0.0.1", 0), load, **options)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 60.0) -> Running:
        end = time.monotonic() + timeout
        while self.get("/health")[0] != 200:
            assert time.monotonic() < end, "the server did not get ready"
            time.sleep(0.05)
        return self

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        data = json.loads(r.read() or b"null")
        conn.close()
        return r.status, data

    def close(self) -> None:
        self.server.close()
        self.thread.join(5)


@pytest.fixture
def serve():
    started = []

    def start(load, **options) -> Running:
        started.append(Running(load, **options))
        return started[-1]

    yield start
    for r in started:
        r.close()


def fresh(model: vlm.Model, prompt, **options) -> vlm.GenerationResult:
    return model.generate(prompt, session=model.new_session(), **options)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain.", "What is 2 + 2?",
           "Who wrote Hamlet?", "Give me a word that rhymes with cat.", "Describe the sun.", "Say hello in Spanish."]


def test_streamed_equals_whole_equals_generate(serve, smollm2):
    client = serve(lambda: smollm2, parallel=2).wait_ready().client()
    messages = chat(PROMPTS[0])
    session = smollm2.new_session()
    first, again = (smollm2.generate(messages, max_new_tokens=24, session=session) for _ in range(2))
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 2  # the last two run again (reusable_prefix)

    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == first.text
    assert whole.choices[0].finish_reason == first.stats.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (first.stats.prompt_tokens, 24)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert whole.model_extra["timings"]["predicted_n"] == 24

    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == again.text  # the same slot again: the prompt's prefix was reused
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.stats.cached_tokens
    assert all(c.usage is None for c in chunks[:-1])

    text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert text.choices[0].text == fresh(smollm2, "Once upon a time", raw=True, max_new_tokens=12).text
    assert text.object == "text_completion"
    pieces = client.completions.create(model="m", prompt="The sky is", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == fresh(smollm2, "The sky is", raw=True, max_new_tokens=8).text


def test_concurrent_clients_get_their_sequential_greedy_answers(serve, smollm2):
    expected = [fresh(smollm2, chat(p), max_new_tokens=16).text for p in PROMPTS]
    running = serve(lambda: smollm2, parallel=8).wait_ready()

    def ask(prompt: str) -> str:
        r = running.client().chat.completions.create(model="m", messages=chat(prompt), max_tokens=16, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, PROMPTS)) == expected


def test_images_as_data_uris_media_paths_and_urls(serve, tiny_qwen2vl, tmp_path):
    from PIL import Image

    model = vlm.load(tiny_qwen2vl)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    expected = fresh(model, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                     images=[png.getvalue()], max_new_tokens=8)
    client = serve(lambda: model).wait_ready().client()
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
    r = client.chat.completions.create(model="m", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": parts}])
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == expected.stats.prompt_tokens > expected.stats.image_tokens > 0
    assert r.model_extra["timings"]["images"] == 1
    with pytest.raises(openai.BadRequestError, match="media-dir"):  # local paths only under --media-dir
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}])
    with pytest.raises(openai.BadRequestError, match="allow-remote-media"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}])

    # a path under --media-dir, and an http URL with --allow-remote-media (served from loopback here)
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "img.png").write_bytes(png.getvalue())
    (tmp_path / "secret.png").write_bytes(png.getvalue())
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler,
                                                                     directory=str(tmp_path / "media")))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        client = serve(lambda: model, media_dir=tmp_path / "media", allow_remote_media=True).wait_ready().client()
        for url in ("img.png", f"http://127.0.0.1:{files.server_address[1]}/img.png"):
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
            r = client.chat.completions.create(model="m", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": parts}])
            assert r.choices[0].message.content == expected.text
        with pytest.raises(openai.BadRequestError, match="no image"):  # nothing outside the folder
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "../secret.png"}}]}])
    finally:
        files.shutdown()


def test_bad_requests_get_openai_errors(serve, tiny_llm):
    model = vlm.load(tiny_llm("llama"))
    running = serve(lambda: model, api_key="sesame", max_body=4096).wait_ready()
    client = running.client("sesame")
    with pytest.raises(openai.AuthenticationError):
        running.client("wrong").chat.completions.create(model="m", messages=chat("hi"))
    bad = [dict(n=2), dict(tools=[{"type": "function", "function": {"name": "f"}}]), dict(temperature="hot"),
           dict(top_p=1.5), dict(max_tokens=0), dict(stop=[1]), dict(frequency_penalty=0.5),
           dict(extra_body={"stream_options": "usage"})]
    for fields in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=chat("hi"), **fields)
        assert e.value.status_code == 400 and e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="unrecognized request argument: colour"):
        client.chat.completions.create(model="m", messages=chat("hi"), extra_body={"colour": "blue"})
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])
    for ids in ([-1], [2**64]):  # a 400, not an internal error from the int64 conversion
        with pytest.raises(openai.BadRequestError, match="token id out of range"):
            client.completions.create(model="m", prompt=ids)
    key = {"Authorization": "Bearer sesame", "Content-Type": "application/json"}
    status, body = running.request("POST", "/v1/chat/completions", b"{not json", key)
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and "JSON" in body["error"]["message"]
    status, body = running.request("POST", "/v1/chat/completions", json.dumps(
        {"messages": chat("x" * 5000)}).encode(), key)
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    assert running.request("GET", "/v1/nothing", None, key)[0] == 404
    assert running.get("/v1/models")[0] == 401
    # the connection still works after errors: a good request
    r = client.chat.completions.create(model="m", messages=chat("hi"), max_tokens=3, temperature=0)
    assert r.choices[0].message.content == fresh(model, chat("hi"), max_new_tokens=3).text


def test_a_stalled_or_idle_client_is_dropped_after_the_timeout(serve, tiny_llm):
    running = serve(lambda: vlm.load(tiny_llm("llama")), connection_timeout_s=0.5).wait_ready()
    stalled = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt"  # a body cut short
    idle = b"GET /health HTTP/1.1\r\n\r\n"  # answered, then nothing more on the kept-alive connection
    for request in (stalled, idle, b""):
        with socket.create_connection(("127.0.0.1", running.port)) as s:
            s.sendall(request)
            s.settimeout(10)
            t = time.monotonic()
            received = b""
            while chunk := s.recv(4096):
                received += chunk
            assert time.monotonic() - t < 5  # closed by the server, not by our 10 s timeout
            assert received.startswith(b"HTTP/1.1 200") if request is idle else received == b""
    assert running.get("/health")[0] == 200


def test_health_is_503_while_loading(serve, tiny_llm):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return vlm.load(tiny_llm("llama"))

    running = serve(slow_load)
    status, body = running.get("/health")
    assert status == 503 and "loading" in body["error"]["message"]
    assert running.get("/v1/models")[0] == 503
    loaded.set()
    running.wait_ready()
    status, models = running.get("/v1/models")
    assert status == 200 and models["data"][0]["object"] == "model"


def test_a_client_gone_midstream_frees_its_slot_at_once(serve, smollm2):
    running = serve(lambda: smollm2, parallel=1).wait_ready()
    body = json.dumps({"messages": chat("Tell me a long story."), "max_tokens": 400, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    while not reader.readline().startswith(b"data: "):  # headers, then the first chunk
        pass
    assert running.get("/health")[1]["slots_processing"] == 1
    reader.close()
    sock.close()  # hang up: 400 tokens would take seconds
    t = time.monotonic()
    while running.get("/health")[1]["slots_processing"]:
        assert time.monotonic() - t < 2.0, "the slot was not freed"
        time.sleep(0.02)
    # the slot serves the next request
    r = running.client().chat.completions.create(model="m", messages=chat("Hi"), max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_soak_many_requests_from_threads(serve, smollm2):
    """300 short requests from 8 threads, each thread with its client (as apps keep one): none
    fails, and memory is flat (the second 150 grow it no more than the first warmed it)."""
    running = serve(lambda: smollm2, parallel=8).wait_ready()
    clients = threading.local()

    def ask(i: int) -> str:
        if not hasattr(clients, "client"):
            clients.client = running.client()
        if i % 3:
            r = clients.client.completions.create(model="m", prompt=f"Count: {i % 17}", max_tokens=3, temperature=0.7,
                                                  seed=i)
            return r.choices[0].finish_reason
        chunks = clients.client.chat.completions.create(model="m", messages=chat(f"Number {i % 11}?"), max_tokens=3,
                                                        temperature=0, stream=True)
        return [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(150))) <= {"stop", "length"}
        middle = rss_mib()
        assert set(pool.map(ask, range(150, 300))) <= {"stop", "length"}
    assert rss_mib() - middle < 8
    assert running.get("/health")[1]["slots_processing"] == 0


def test_vlm_serve_stops_cleanly_on_sigterm(tiny_llm, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "vlm", "serve", "-m", str(tiny_llm("llama")), "--port", str(port)],
                            cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end and proc.poll() is None, "vlm serve did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        proc.kill()


def test_a_long_prompt_is_prefilled_between_the_steps_of_running_streams(serve, tiny_llm, monkeypatch):
    """Prompt chunks are interleaved with batched decode steps: a stream keeps getting tokens
    while a new request's long prompt is prefilled, one chunk per turn."""
    import vlm.server

    model = vlm.load(tiny_llm("llama"), prefill_chunk=16)
    running = serve(lambda: model, parallel=2).wait_ready()
    scheduler, steps = running.server.scheduler, []
    real_step = vlm.server.step_together

    def logged_step(sessions, tokens):
        steps.append((len(sessions), sum(slot.prefill is not None for slot in scheduler.slots)))
        time.sleep(0.005)  # the tiny model's 400 tokens must outlast the second request's arrival on a loaded CI box
        return real_step(sessions, tokens)

    monkeypatch.setattr(vlm.server, "step_together", logged_step)
    stream = running.client().completions.create(model="m", prompt="a", max_tokens=400, temperature=0, stream=True)
    next(iter(stream))
    long_prompt = " ".join(["word"] * 30)  # several chunks of 16
    r = running.client().completions.create(model="m", prompt=long_prompt, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens > 100
    stream.close()
    assert sum(1 for rows, prefilling in steps if rows == 1 and prefilling == 1) >= 5  # the stream stepped on
