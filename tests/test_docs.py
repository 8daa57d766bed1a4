"""Every ```python block of docs/api.md runs, in order, in one namespace, and does what the page
says: the asserts written in the examples hold, a `print(...)  # text` line prints that text,
and the objects the examples build are what the prose describes."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_examples_run(smollm2_gguf):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, code in enumerate(blocks):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as e:  # report which example broke
            pytest.fail(f"docs/api.md example {i + 1} failed: {type(e).__name__}: {e}")
        for promised in re.findall(r"^print\(.*\)\s+#\s*(.+)$", code, flags=re.M):
            assert promised.strip() in out.getvalue(), f"example {i + 1} should print {promised.strip()!r}"
    ns = namespace
    assert ns["model"].info["architecture"] == "llama" and ns["model"].context == 4096
    assert ns["result"].text and ns["result"].stats.generated_tokens == len(ns["result"].tokens) > 0
    assert ns["stream"].stats.finish_reason in ("stop", "length") and ns["stream"].result.tokens
    assert ns["reply"].text and len(ns["chat"].messages()) == 5  # system + two (user, assistant) turns
    assert ns["logits"].dtype == np.float32 and np.isfinite(ns["logits"]).all()
    assert ns["chat_logits"].shape[0] == ns["model"].prepare([{"role": "user", "content": "Hi"}]).ids.size
