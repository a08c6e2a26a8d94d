"""The house rules: layers point downwards (flows -> tasks -> storage), the stage packages of tasks/ import
only what the table below allows, no module imports itself back (also through ``TYPE_CHECKING``), modules
stay under 400 lines and functions under 60 (benchmarks too), no module-level name goes unused, flows/ is grouped
in floors, and no test imports another."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from storage.records import STAGE_FOLDERS
from tasks.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"storage": 0, "tasks": 1, "flows": 2}

#: what each package of tasks/ may import besides storage/ and the shared modules (tasks/*.py): the two that
#: hold no stage import no other; each stage's own declaration says what its package may import
PACKAGES = {"data": set(), "backbones": set()} | {s.package: set(s.imports) for s in STAGES}
#: the shared module that lists every stage (and so imports every stage package)
STAGE_LIST = "tasks.stages"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: module names that say the same thing in every stage package
REPEATABLE = {"__init__", "plan", "stage", "loop", "config"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _paths() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of this project that ``path`` imports, at module level, inside functions and under
    ``TYPE_CHECKING`` (an import for annotations is still a dependency). ``from p import m`` where ``p.m`` is a
    module counts as importing ``p.m`` only, not the package ``p``."""
    names = set()
    me = _module_name(path)
    package = me if path.stem == "__init__" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            names |= subs if len(subs) == len(node.names) else subs | {base}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n in modules and n != me}


def _modules() -> dict[str, set[str]]:
    paths = _paths()
    names = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, names) for p in paths}


def _package(module: str) -> str | None:
    """The stage package of a tasks module (``tasks.heads.stage`` -> ``heads``), None for the shared ones."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 1 and parts[1] in PACKAGES else None


def test_the_walk_sees_every_package():
    found = {_package(m) for m in _modules()} - {None}
    assert found == set(PACKAGES), "a package of tasks/ is missing from PACKAGES (or PACKAGES names one gone)"


def test_imports_point_downwards_only():
    upward = [(name, imported) for name, imports in _modules().items() for imported in imports
              if LAYERS[imported.split(".")[0]] > LAYERS[name.split(".")[0]]]
    assert upward == []


def test_stage_packages_import_only_what_they_may():
    bad = []
    for name, imports in _modules().items():
        if not name.startswith("tasks"):
            continue
        mine = _package(name)
        for imported in imports if name != STAGE_LIST else ():
            theirs = _package(imported)
            if not imported.startswith("tasks.") or theirs is None or theirs == mine:
                continue
            if mine is None or theirs not in PACKAGES[mine]:
                bad.append(f"{name} imports {imported}")
    assert bad == []


#: flows/ by role: each floor imports only the floors below it (a sub-package or a top-level module)
FLOWS_FLOORS = [{"config_errors", "defaults"}, {"config"}, {"execution"}, {"planning"}, {"pipeline", "notebook"},
                {"experiments", "operations"}, {"cli"}]


def test_flows_sub_packages_import_downwards_and_stay_few():
    """flows/ grouped by role: at most 9 top-level modules, none over 300 lines, and each part imports only the
    parts on the floors below it (no circle between sub-packages, not only between modules)."""
    floor = {part: n for n, parts in enumerate(FLOWS_FLOORS) for part in parts}
    top = sorted(p.stem for p in (REPO / "flows").glob("*.py") if p.stem != "__init__")
    assert set(top) | {p.name for p in (REPO / "flows").iterdir() if (p / "__init__.py").is_file()} == set(floor)
    assert len(top) + 1 <= 9, top
    assert [str(p) for p in (REPO / "flows").rglob("*.py") if len(p.read_text().splitlines()) > 300] == []
    bad = [(name, imported) for name, imports in _modules().items() if name.startswith("flows.")
           for imported in imports if imported.startswith("flows.")
           and (a := name.split(".")[1]) != (b := imported.split(".")[1]) and floor[b] >= floor[a]]
    assert bad == []


def test_a_module_never_imports_its_own_package():
    """``tasks/heads/__init__.py`` imports the package's modules; a module importing ``tasks.heads`` back is a
    circle Python resolves only by import order."""
    bad = [(name, imported) for name, imports in _modules().items() for imported in imports
           if name.startswith(imported + ".")]
    assert bad == []


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


def test_modules_and_functions_stay_small():
    big = []
    for path in [*_paths(), *sorted((REPO / "benchmarks").glob("*.py"))]:
        text = path.read_text()
        rel = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    big.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert big == []


def test_every_module_level_name_is_used_somewhere():
    """A cheap dead-code check: every function, class and constant defined at module level in flows/, tasks/ or
    storage/ is named at least once more in the repository's Python (a use, an import, a string that names it),
    except commands registered by a decorator."""
    import re

    texts = [p.read_text() for d in (*LAYERS, "tests", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))]
    counts: dict[str, int] = {}
    for word in re.findall(r"\b[A-Za-z_]\w*\b", "\n".join(texts)):
        counts[word] = counts.get(word, 0) + 1
    unused = []
    for path in _paths():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [] if node.decorator_list else [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                names = []
            unused += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                       if counts.get(n, 0) <= 1 and not n.startswith("__")]
    assert unused == []


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("test_*.py")) + sorted((REPO / "benchmarks").glob("*.py")),
                         ids=lambda p: p.name)
def test_no_test_or_benchmark_imports_a_test_module(path):
    bad = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
           and n.module and n.module.startswith(("tests", "test_", "conftest"))}
    assert not bad


def _layout_names() -> set[str]:
    """Every folder and file name storage/layout.py spells (``root / "name"``): derived, so a folder added to the
    layout is guarded here at once (and one removed from it stops being)."""
    tree = ast.parse((REPO / "storage" / "layout.py").read_text())
    return {node.right.value for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)}


CACHE_NAMES = _layout_names() | {c.cache_folder for c in STAGE_FOLDERS.values()} | {"shards"}  # shards/: pieces before features/pieces/
CACHE_SUFFIXES = (".json", ".md", ".png", ".pt", ".h5", ".partial", ".lock", ".sqlite", ".safetensors", ".faiss",
                  ".parquet", ".npy")


def _spelled(node: ast.AST) -> str | None:
    """The file or folder name a ``path / <name>`` spells: a string, or an f-string's literal ending."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[-1], ast.Constant):
        return str(node.values[-1].value)
    return None


@pytest.mark.parametrize("path", sorted((REPO / "tasks").rglob("*.py")) + sorted((REPO / "flows").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_only_storage_spells_the_cache_layout(path):
    """Paths into the cache are built by storage/ (layout.py and the files classes), never by ``x / "name"``."""
    spelled = [name for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
               and (name := _spelled(node.right)) is not None
               and (name in CACHE_NAMES or name.endswith(CACHE_SUFFIXES))]
    if path == REPO / "tasks" / "data" / "synthetic.py":  # a bundled dataset's own images, named as a folder source reads them
        spelled = [name for name in spelled if not name.endswith(".png")]
    assert spelled == []


def test_module_names_say_one_thing():
    """No two modules share a name across layers and packages (a ``runtime.py`` in flows/ and one in tasks/ meant
    two things), except the names every stage package uses for the same parts (``plan``, ``stage``, ``loop``)."""
    names = [p.stem for p in _paths() if p.stem not in REPEATABLE]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_keys_are_computed_in_storage_keys_only():
    """Every key (a stage's, Prefect's cache key, a memo's, a piece group's, an event resource's) comes from a
    function of storage/keys.py, which holds their formulas and versions; elsewhere only ``keys.fingerprint``
    of a value that is not a key (the test images' identity) is allowed."""
    callers = {}
    for path in [*sorted((REPO / "tasks").rglob("*.py")), *sorted((REPO / "flows").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "fingerprint":
                callers.setdefault(str(path.relative_to(REPO)), []).append(node.lineno)
    assert set(callers) <= {"tasks/evaluate/stage.py"}, callers


def test_every_declared_stage_is_listed():
    """A package whose plan declares a ``STAGE`` that tasks/stages.py does not list would never run: found by
    walking the packages, not by being told."""
    import importlib
    import pkgutil

    import tasks

    declared = set()
    for info in pkgutil.iter_modules(tasks.__path__):
        if info.ispkg and (REPO / "tasks" / info.name / "plan.py").is_file():
            stage = getattr(importlib.import_module(f"tasks.{info.name}.plan"), "STAGE", None)
            if stage is not None:
                declared.add(stage.name)
    assert declared == {s.name for s in STAGES}, "a package declares a STAGE that tasks/stages.py lacks"
    assert len({s.name for s in STAGES}) == len(STAGES) and len({s.task for s in STAGES}) == len(STAGES)
    for s in STAGES:
        assert set(s.after) <= {t.name for t in STAGES[:STAGES.index(s)]}, f"{s.name} comes after a later stage"
