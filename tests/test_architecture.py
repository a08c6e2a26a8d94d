"""The layers point downwards (flows → tasks → storage), no module imports itself back, and no test imports another."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"storage": 0, "tasks": 1, "flows": 2}


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path) -> set[str]:
    """Modules of this project that ``path`` imports at run time, at module level or inside functions."""
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n.split(".")[0] in LAYERS}


def _modules() -> dict[str, set[str]]:
    found = {}
    for layer in LAYERS:
        for path in (REPO / layer).glob("*.py"):
            name = f"{layer}.{path.stem}" if path.stem != "__init__" else layer
            found[name] = _imports(path)
    return {name: {i for i in imports if i in found and i != name} for name, imports in found.items()}


def test_imports_point_downwards_only():
    upward = [(name, imported) for name, imports in _modules().items() for imported in imports
              if LAYERS[imported.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert upward == []


def test_no_import_cycles():
    graph = _modules()

    def in_cycle(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == start:
                return True
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        return False

    assert [name for name in graph if in_cycle(name)] == []


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("test_*.py")) + sorted((REPO / "benchmarks").glob("*.py")),
                         ids=lambda p: p.name)
def test_no_test_or_benchmark_imports_a_test_module(path):
    bad = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
           and n.module and n.module.startswith(("tests", "test_", "conftest"))}
    assert not bad


CACHE_NAMES = {"features", "heads", "finetune", "runs", "scores", "manifests", "backbones", "metrics", "select",
               "datasets", "quarantine", "shards"}
CACHE_SUFFIXES = (".json", ".md", ".png", ".pt", ".h5", ".partial", ".lock", ".sqlite", ".safetensors")


@pytest.mark.parametrize("path", sorted((REPO / "tasks").glob("*.py")) + sorted((REPO / "flows").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_storage_spells_the_cache_layout(path):
    """Paths into the cache are built by storage/ (layout.py and the files classes), never by ``x / "name"``."""
    spelled = [node.right.value for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
               and isinstance(node.right.value, str)
               and (node.right.value in CACHE_NAMES or node.right.value.endswith(CACHE_SUFFIXES))]
    assert spelled == []


def test_module_names_say_one_thing():
    """No two modules share a name across layers (a ``runtime.py`` in flows/ and one in tasks/ meant two things)."""
    names = [p.stem for layer in LAYERS for p in (REPO / layer).glob("*.py") if p.stem != "__init__"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
