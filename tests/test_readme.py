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


@pytest.mark.parametrize("wide, width", [(False, 80), (True, 200)])
def test_the_demo_table_shows_whole_numbers_at_80_columns_and_everything_wide(wide, width, capsys):
    """Issue 46: at 80 columns the table cut intervals mid-number and folded each row over three lines."""
    from flows.cli import views
    from flows.cli.console import out

    table = readme.section(readme.README.read_text(), "demo").splitlines()
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    old = out.width
    out.width = width
    try:
        views.comparison("second-scanner digits", columns, rows, wide=wide)
    finally:
        out.width = old
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    body = "\n".join(lines)
    for row in rows:  # one line a row, every number whole
        cells = row if wide else [*row[:2], *(c.split(" (")[0] for c in row[2:-1]), row[-1]]
        assert any(all(c in line for c in cells) for line in lines), (cells, body)


def test_the_demo_finds_every_config_it_reads():
    """The demo reads its experiments from the checkout's configs/ (found from its own module's place, so a
    module move that breaks it fails here in seconds, not only in the five-minute demo test)."""
    import re

    from flows.experiments import demo

    text = Path(demo.__file__).read_text()
    named = set(re.findall(r'"([\w-]+\.yaml)"', text))
    assert {"demo-source.yaml", "demo-target.yaml"} <= named
    assert [name for name in sorted(named) if not (demo.CONFIGS / name).is_file()] == []
