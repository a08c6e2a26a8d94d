"""The README is a front door (short, pointing into docs/), and every relative link and anchor in the
README and docs/ resolves: a moved section or a renamed file is a failing test, not a dead link."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
README_MAX_LINES = 150  # a front door: detail lives in docs/


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if not line.startswith("#"):
            continue
        text = line.lstrip("#").strip()
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", path.read_text()))]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert broken == []


def test_the_readme_is_a_front_door():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md") if t.startswith("docs/")}
    assert {p.resolve() for p in PAGES[1:]} <= linked, "a docs/ page the README does not link"


def test_the_checker_catches_a_dead_link_and_anchor(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title here\n\n[ok](#title-here) [gone](#nowhere) [file](b.md)\n```\n# not a heading\n```\n")
    assert anchors(page) == {"title-here"}
    assert links(page) == ["#title-here", "#nowhere", "b.md"]


def test_developing_says_which_tests_cover_which_package():
    """Every test file is in docs/DEVELOPING.md's table of packages and their tests."""
    table = (REPO / "docs" / "DEVELOPING.md").read_text()
    assert [p.name for p in sorted((REPO / "tests").glob("test_*.py")) if f"`{p.name}`" not in table] == []


def _spelled_by_layout() -> set[str]:
    """The top-level cache names storage/layout.py spells (``root / "name"``), pieces and quarantine aside."""
    import ast

    layout = ast.parse((REPO / "storage" / "layout.py").read_text())
    spelled = {n.right.value for n in ast.walk(layout) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
               and isinstance(n.right, ast.Constant) and isinstance(n.right.value, str)}
    return {name.split(".")[0] for name in spelled if name not in ("pieces", "quarantine")}


def _tree(text: str) -> set[str]:
    """The top-level names of a ``<cache_dir>/`` tree (lines indented by two spaces)."""
    tree = text.split("<cache_dir>/", 1)[1].split("```", 1)[0]
    return {line.split()[0].split("/")[0].split(".")[0] for line in tree.splitlines()
            if line.startswith("  ") and not line.startswith("   ")}


def test_the_cache_tree_in_the_docs_names_every_folder_the_cache_has():
    """docs/cache.md's tree against storage/: every folder storage/layout.py spells and every folder a files
    class declares (storage/records.py): adding one without documenting it, or documenting one gone, fails.
    storage/layout.py's own docstring lists exactly the names it spells."""
    from storage.records import STAGE_FOLDERS

    top = _spelled_by_layout() | {files.cache_folder for files in STAGE_FOLDERS.values()}
    documented = _tree((REPO / "docs" / "cache.md").read_text())
    assert top - documented == set(), "folders of the cache the docs' tree lacks"
    assert documented - top == set(), "folders the docs' tree names that storage/ does not make"
    import storage.layout

    assert _tree(storage.layout.__doc__) == _spelled_by_layout()


def test_the_architecture_stage_table_has_every_stage_and_its_folder():
    """docs/ARCHITECTURE.md's table of what each stage writes: a row per declared stage (tasks/stages.py), and
    every folder a files class declares is in it."""
    from storage.records import STAGE_FOLDERS
    from tasks.stages import STAGES

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("stage      writes under <cache_dir>/", 1)[1].split("keys of all of them", 1)[0]
    rows = {line.split()[0] for line in table.splitlines() if line.startswith("     ") and line[5:6].strip()}
    assert rows == {s.name for s in STAGES}
    assert {f"{files.cache_folder}/" for files in STAGE_FOLDERS.values()} <= set(re.findall(r"[\w-]+/", table))


def test_the_keys_table_names_every_key_and_version_storage_keys_makes():
    """docs/ARCHITECTURE.md's keys table against storage/keys.py: a key function or a code version added without
    a row, or a row naming a function gone, fails."""
    import ast

    from storage.keys import CODE_VERSIONS

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.split("| key | built by | version | covers |", 1)[1].split("\n\n")[0]
            .splitlines()[2:]]
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row[1])}
    versions = {name for row in rows for name in re.findall(r"`(\w+)`", row[2])}
    tree = ast.parse((REPO / "storage" / "keys.py").read_text())
    helpers = {"canonical_json", "fingerprint", "file_sha256", "file_identities", "key", "short", "spec_diff", "closest"}
    makers = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")} - helpers
    assert makers - named == set(), "key functions of storage/keys.py the table lacks"
    assert named - makers == set(), "functions the table names that storage/keys.py does not define"
    assert set(CODE_VERSIONS) == versions, "code versions the table lacks (or names that are none)"


def test_the_goal_paths_in_the_architecture_say_what_the_declarations_say():
    """docs/ARCHITECTURE.md's list of stages and the stages each comes after, against tasks/stages.py."""
    from tasks.stages import STAGES

    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("\n```\nextract   ()", 1)[1].split("```", 1)[0]
    documented = dict(re.findall(r"(?:^|\|\s*)([\w-]+)\s+\(([^)]*)\)", "extract   ()" + block, re.M))
    assert {name: tuple(a.strip() for a in after.split(",") if a.strip()) for name, after in documented.items()} \
        == {s.name: s.after for s in STAGES}


def test_the_configuration_page_lists_every_head_kind_and_data_source():
    """The reference config's comments name every head kind (tasks/heads/configs.py) and data source."""
    from tasks.data.config import SOURCES
    from tasks.heads.configs import CONFIGS

    text = (REPO / "docs" / "configuration.md").read_text()
    kinds = re.search(r"- kind: \w+ +# ([\w |]+)", text).group(1)
    assert {k.strip() for k in kinds.split("|")} == set(CONFIGS)
    sources = re.search(r"\bsource: \w+ +# a dataset source: ([\w |]+)", text).group(1)
    assert {k.strip() for k in sources.split("|")} == set(SOURCES)
