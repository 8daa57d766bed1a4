"""The package's modules depend downward only: no import cycle, no import from a higher layer.

The layers, lowest first, are those of docs/architecture.md. Every import counts, including
those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlm"

# Lowest first. A module belongs to the layer of its longest listed prefix; a module may import
# its own layer (without a cycle) and every layer below.
LAYERS = [
    ["vlm.errors"],
    ["vlm.quant", "vlm.memory", "vlm.image", "vlm.tokenizer", "vlm.prompt", "vlm.hub", "vlm.registry"],
    ["vlm.kernels"],
    ["vlm.formats"],
    ["vlm.models"],
    ["vlm.session"],
    ["vlm.generation"],
    ["vlm.runtime"],
    ["vlm.loader", "vlm.chat", "vlm.caption", "vlm.caption_ray", "vlm.bench", "vlm.convert", "vlm.server"],
    ["vlm.cli", "vlm.__main__", "vlm.testing", "vlm"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from vlm import kernels` imports the module vlm.kernels; `from vlm.x import name` imports vlm.x.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return layer


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_upward_imports():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_what_it_should():
    graph = _graph()
    assert "vlm.session" in graph["vlm.runtime"]  # a plain from-import
    assert "vlm.kernels" in graph["vlm.runtime"]  # `from vlm import kernels`
    assert "vlm.caption" in graph["vlm.cli"]  # an import inside a function
    assert _layer("vlm.models.qwen2_vl.vision") == _layer("vlm.models") > _layer("vlm.formats.gguf")
