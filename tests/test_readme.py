"""The README's demo table is what ``transferpipe demo`` prints today, with the locked libraries.

``python -m benchmarks.readme`` writes the table; this test runs the demo as a
user would (a subprocess, a fresh cache and Prefect home) and compares by the
demo's own rule (flows/experiments/demo_check.py: every top-1 within the spread
measured across CPU kernels; equal on a CPU with AVX2, where the demo pins its
kernels). When it fails after a dependency bump: rerun that script and commit
the README with constraints.txt.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import readme
from flows.experiments import demo_check

COLUMNS = demo_check.COLUMNS


def test_every_section_has_its_markers():
    assert set(readme.PAGES) == set(readme.SECTIONS)
    for name in readme.SECTIONS:
        assert readme.section(readme.page(name).read_text(), name).startswith(("| ", "**")), name


def test_a_missing_marker_is_named():
    with pytest.raises(ValueError, match="readme:demo"):
        readme.section("no markers here", "demo")


@pytest.mark.slow
def test_demo_prints_the_readme_table(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the README's numbers: the pinned kernels' 2 threads
    stdout = readme.run("demo", tmp_path)
    printed, expected = readme.table(stdout), readme.section(readme.README.read_text(), "demo")
    off = demo_check.beyond(*(demo_check.figures(demo_check.markdown_rows(t), COLUMNS) for t in (printed, expected)))
    assert off == [], (
        "transferpipe demo moved numbers beyond the README's spread: python -m benchmarks.readme --only demo, "
        "then commit README.md with constraints.txt\n" + "\n".join(off) + f"\nprinted:\n{printed}")
    words = " ".join(stdout.split())  # the console folds long lines at 80 columns
    assert "README check: all 26 top-1 figures" in words, stdout[-3000:]
    if "avx2" in Path("/proc/cpuinfo").read_text():  # the demo started itself again with the pinned kernels
        assert "(reproducible kernels)" in words, stdout[-3000:]


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


def test_the_readme_check_names_each_figure_beyond_the_spread(tmp_path):
    """Issue 46: the demo's last line compares its numbers with the README's, by one rule (the slow test's too)."""
    expected = demo_check.markdown_rows(demo_check.readme_table(readme.README.read_text()))
    assert len(demo_check.figures(expected, COLUMNS)) == 26
    assert demo_check.verdict(expected, COLUMNS) == "README check: all 26 top-1 figures equal the README's"
    near = [list(row) for row in expected]
    near[0][2] = f"{float(near[0][2].split()[0]) + demo_check.SPREAD_POINTS / 100 * 0.9:.3f} (0.1-0.9)"
    assert "all 26 top-1 figures within the README's" in demo_check.verdict(near, COLUMNS)
    far = [list(row) for row in expected]
    far[3][3] = "0.100 (0.05-0.15)"
    line = demo_check.verdict(far, COLUMNS)
    assert line.startswith("README check: 1 of 26 top-1 figures beyond the README's")
    assert f"{far[3][0]} {far[3][1]} labels/class, random init: 0.100 (README " in line
    assert "not printed" in demo_check.verdict(expected[:-1], COLUMNS)
    assert "nothing to compare" in demo_check.verdict(expected, COLUMNS, readme=tmp_path / "README.md")


def test_the_readme_states_the_spread_the_check_uses():
    text = readme.README.read_text()
    assert f"±{demo_check.SPREAD_POINTS:g} points" in text


def test_the_kernel_benchmark_reads_a_demos_output():
    """benchmarks/demo_kernels.py (four whole demos, not in the quick runs) reads each run's table and lines."""
    from benchmarks.demo_kernels import summary

    table = demo_check.readme_table(readme.README.read_text())
    expected = demo_check.figures(demo_check.markdown_rows(table), COLUMNS)
    stdout = (table + "near-duplicate pairs: train 5, train-val 4, val 1, train-test 3, val-test 0, \ntest 0 "
              "(0 byte-identical)\nleaks: 3 test image(s) with a near-duplicate in train or val\nnew batch (162 "
              "unlabelled images, logistic): 140 single-label sets, 22 empty (no\nlabel sure enough) at 0.89 test "
              "coverage; flagged")
    assert summary(stdout, expected) == ["26 of 26", "0", "13, 3", "140 at 0.89"]
    moved = stdout.replace("| knn | 1 | 0.597", "| knn | 1 | 0.684")
    assert summary(moved, expected)[:2] == ["25 of 26", "8.7 points (knn 1 labels/class)"]


def test_the_readme_check_compares_the_quality_and_new_batch_counts_for_equality():
    text = readme.README.read_text()
    stated = demo_check.readme_counts(text)
    assert stated == {"near-duplicate pairs": 13, "leaked test images": 3, "single-label sets": 140,
                      "test coverage": 0.89, "new digits flagged": 5}
    rows = demo_check.markdown_rows(demo_check.readme_table(text))
    line = demo_check.verdict(rows, COLUMNS, counts=dict(stated))
    assert line.endswith("the quality and new-batch counts: all 5 equal"), line
    line = demo_check.verdict(rows, COLUMNS, counts={**stated, "near-duplicate pairs": 31})
    assert "1 of 5 differ: near-duplicate pairs 31 (README 13)" in line


def test_the_imagenet_demo_is_checked_against_the_performance_page():
    """Issue 46.4: ``demo --imagenet`` ends with the same check, against docs/performance.md's table."""
    columns = ["model", "labels per class", "ImageNet", "random init", "raw pixels", "gain over random"]
    table = demo_check.readme_table(demo_check.PERFORMANCE.read_text(), "imagenet")
    rows = demo_check.markdown_rows(table)
    n = len(demo_check.figures(rows, columns))
    assert n >= 30  # LP-FT's cells for random init and pixels are "-": not figures
    line = demo_check.verdict(rows, columns, readme=demo_check.PERFORMANCE, section="imagenet",
                              spread=demo_check.IMAGENET_SPREAD_POINTS)
    assert line == f"README check: all {n} top-1 figures equal the README's"
