"""The README's demo table is what ``transferpipe demo`` prints today, with the locked libraries.

``python -m benchmarks.readme`` writes the table; this test runs the demo as a
user would (a subprocess, a fresh cache and Prefect home) and compares. When
it fails after a dependency bump: rerun that script and commit the README with
constraints.txt.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import readme


def test_every_section_has_its_markers():
    assert set(readme.PAGES) == set(readme.SECTIONS)
    for name in readme.SECTIONS:
        assert readme.section(readme.page(name).read_text(), name).startswith(("| ", "**")), name


def test_a_missing_marker_is_named():
    with pytest.raises(ValueError, match="readme:demo"):
        readme.section("no markers here", "demo")


@pytest.mark.slow
def test_demo_prints_the_readme_table(tmp_path: Path):
    printed = readme.measure("demo", tmp_path)
    assert printed == readme.section(readme.README.read_text(), "demo"), (
        "transferpipe demo no longer prints the README's table: python -m benchmarks.readme --only demo, "
        f"then commit README.md with constraints.txt\nprinted:\n{printed}")
