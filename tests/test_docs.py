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
