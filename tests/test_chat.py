"""`vlm chat` driven in a pseudo-terminal as a user would, and the Python Chat object."""

import json
import signal
import sys

import pytest

import vlm

pexpect = pytest.importorskip("pexpect")


def _default_sigint() -> None:
    # A suite started in the background (`cmd &` in a script) runs with SIGINT ignored, which the
    # chat would inherit: Ctrl-C must reach it as it does from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(*args, timeout=120):
    child = pexpect.spawn(sys.executable, ["-m", "vlm", "chat", *map(str, args)], encoding="utf-8",
                          timeout=timeout, dimensions=(40, 200), preexec_fn=_default_sigint)
    child.expect("/help for commands")
    return child


def test_chat_session_commands(tiny_llm, tmp_path):
    child = spawn("-m", tiny_llm("llama"), "-n", "8")
    child.expect("> ")
    child.sendline("/help")
    child.expect("/image PATH")
    child.sendline("/stats")
    child.expect("no answer yet")
    child.sendline("Hello there!")
    child.expect(r"prompt \d+ tok \| prefill [\d.]+ tok/s \| decode [\d.]+ tok/s \| first token")
    child.sendline("And again?")
    child.expect(r"prompt \d+ tok \((\d+) cached\)")  # the first turn was reused from the KV cache
    assert int(child.match.group(1)) > 10
    child.sendline(f"/save {tmp_path / 't.json'}")
    child.expect("saved")
    child.sendline("/image /no/such.png")
    child.expect("image not found")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("Hi")
    child.expect(r"prompt (\d+) tok \|")  # nothing cached after /reset
    child.sendline("/bogus")
    child.expect("unknown command")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]
    assert saved["messages"][0]["content"] == "Hello there!"


def test_ctrl_c_stops_the_answer_not_the_session(smollm2_gguf):
    child = spawn("-m", smollm2_gguf, "-n", "4000", "--ctx", "4096")
    child.expect("> ")
    child.sendline("Write a very long story about a dragon who learns to paint, with many chapters.")
    child.expect("chapters\\.\r\n")  # our line echoed; what follows is the answer
    child.expect(r"\w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(r"decode [\d.]+ tok/s")
    child.expect("> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_context_overflow_drops_oldest_turns(tiny_llm):
    child = spawn("-m", tiny_llm("llama"), "-n", "8", "--ctx", "96")
    for i in range(6):
        child.expect("> ")
        child.sendline(f"Message number {i} with several words in it.")
    child.expect(r"context full: dropped the \d+ oldest turn")
    child.expect(r"decode [\d.]+ tok/s")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_chat_object_keeps_history_and_cache(tiny_llm, tmp_path):
    model = vlm.load(tiny_llm("qwen2"))
    chat = vlm.Chat(model, system="Be brief.", max_new_tokens=6)
    first = chat.send("Hello")
    second = chat.send("More?")
    assert second.stats.cached_tokens > first.stats.prompt_tokens - 2
    roles = [m["role"] for m in chat.messages()]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    stream = chat.send("Streamed?", stream=True)
    text = "".join(stream)
    assert chat.messages()[-1] == {"role": "assistant", "content": text}
    chat.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["system"] == "Be brief."
    chat.reset()
    assert chat.messages() == [{"role": "system", "content": "Be brief."}]
    assert chat.send("Hi").stats.cached_tokens == 0


def test_image_turns_encode_each_image_once(tiny_smolvlm, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png"):
        Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / name)
    child = spawn("-m", tiny_smolvlm, "-n", "4", "--image", tmp_path / "one.png")
    child.expect("> ")
    child.sendline("What is in this picture?")
    child.expect(r"vision [\d.]+ s \(1 img encoded\) \| 1 img = \d+ tok")
    child.expect("> ")
    child.sendline(f"/image {tmp_path / 'two.png'}")
    child.expect("attached")
    child.sendline("And in this one?")
    child.expect(r"vision [\d.]+ s \(1 img encoded\) \| 2 img = \d+ tok")  # only the new image is encoded
    child.expect("> ")
    child.sendline("Compare them.")
    child.expect(r"first token [\d.]+ s \| 2 img = \d+ tok")  # nothing encoded this turn
    child.sendline(f"/image {tmp_path / 'missing.png'}")
    child.expect("image not found")
    child.sendline("/quit")
    child.expect(pexpect.EOF)


def test_chat_preprocesses_each_image_once(tiny_qwen2vl):
    import numpy as np

    model = vlm.load(tiny_qwen2vl)
    calls = []
    real = model.family.preprocess

    def counting(image, **options):
        calls.append(options)
        return real(image, **options)

    model.family.preprocess = counting
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (56, 84, 3), dtype=np.uint8) for _ in range(3)]
    chat = vlm.Chat(model, max_new_tokens=3, max_image_tokens=32)
    first = chat.send("Compare these.", images=images[:2])
    assert len(calls) == 2 and first.stats.images_encoded == 2
    second = chat.send("And this one?", images=images[2:])
    assert len(calls) == 3 and second.stats.images == 3 and second.stats.images_encoded == 1
    "".join(chat.send("Which is brightest?", stream=True))
    assert len(calls) == 3  # no turn preprocessed the history again
    assert calls[0] == {"max_image_tokens": 32}  # the chat's image options reached preprocessing
