"""Every ```python block of docs/api.md runs, in order, in one namespace."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_examples_run(smollm2_gguf, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
        except Exception as e:  # report which example broke
            pytest.fail(f"docs/api.md example {i + 1} failed: {type(e).__name__}: {e}")
