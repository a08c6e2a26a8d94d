"""Whether ``transferpipe demo`` printed the README's numbers: each top-1 equal, or within the spread measured
across CPU kernels (docs/performance.md#reproducibility-across-cpus). The demo ends with this verdict, and tests/test_readme.py applies
the same rule to a real run, so the check passes on any CPU and fails when a change moves a number beyond it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2].joinpath("README.md")  # the checkout's, not the cache's
PERFORMANCE = README.parent.joinpath("docs", "performance.md")  # where --imagenet's table is
#: the columns of the demo's table (the README's)
COLUMNS = ["model", "labels per class", "pretrained on scanner 1", "random init", "gain"]

#: how far a top-1 figure may move, in points, on kernels other than the reproducible ones: the largest move measured
#: (8.7, knn at 1 label per class, AVX-512 kernels; docs/performance.md#reproducibility-across-cpus) rounded up
SPREAD_POINTS = 10.0
#: the same for ``transferpipe demo --imagenet`` against docs/performance.md's table: no figure moved between the
#: AVX-512 and the AVX2 kernels (the ImageNet backbone is frozen; only LP-FT trains it), 1 point allows for LP-FT
IMAGENET_SPREAD_POINTS = 1.0


def readme_table(text: str, section: str = "demo") -> str | None:
    """The demo's table a page holds (between its ``readme:<section>`` markers), or None without one."""
    found = re.search(rf"<!-- readme:{section} -->\n(.*?)<!-- /readme:{section} -->", text, re.S)
    return found.group(1) if found else None


def markdown_rows(table: str) -> list[list[str]]:
    """A markdown table's rows (header and separator left out), each a list of stripped cells."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def _top1(cell: str) -> float | None:
    found = re.match(r"\s*(\d+\.\d+)", cell)
    return float(found.group(1)) if found else None


def figures(rows: list[list[str]], columns: list[str]) -> dict[str, float]:
    """Each top-1 figure of the table by name (``knn 1-shot, random init``): every column but the model, the
    labels per class and the gain."""
    named = {}
    for row in rows:
        for column, cell in zip(columns[2:-1], row[2:-1]):
            value = _top1(cell)
            if value is not None:
                named[f"{row[0]} {row[1]} labels/class, {column}"] = value
    return named


def beyond(printed: dict[str, float], expected: dict[str, float], spread: float = SPREAD_POINTS) -> list[str]:
    """The figures further than ``spread`` points from the README's, or missing from either side, one line each."""
    lines = [f"{name}: not printed" for name in expected if name not in printed]
    lines += [f"{name}: printed, not in the README" for name in printed if name not in expected]
    lines += [f"{name}: {printed[name]:.3f} (README {value:.3f})" for name, value in expected.items()
              if name in printed and abs(printed[name] - value) * 100 > spread + 1e-9]
    return lines


#: the counts the README's prose gives for the quality line and the new batch, and how to find each there
COUNTS = {"near-duplicate pairs": r"(\d+) near-duplicate pairs", "leaked test images": r"(\d+) test images have a near-twin",
          "single-label sets": r"(\d+) single-label sets", "test coverage": r"at (\d\.\d+) test coverage",
          "new digits flagged": r"(\d+) of \d+ digits flagged"}


def readme_counts(text: str) -> dict[str, float]:
    """The quality line's and the new batch's counts as the README's prose states them."""
    found = {name: re.search(pattern, text) for name, pattern in COUNTS.items()}
    return {name: float(match.group(1)) for name, match in found.items() if match}


def demo_counts(quality: Any, predictions: Any, flagged: dict[str, list[int]]) -> dict[str, float]:
    """The same counts from a demo's results (as its quality and new-batch lines print them)."""
    counts: dict[str, float] = {}
    if quality is not None:
        counts.update({"near-duplicate pairs": float(sum(quality.duplicates.values())),
                       "leaked test images": float(quality.leaked_test)})
    if predictions is not None:
        counts.update({"single-label sets": float(predictions.single),
                       "test coverage": round(float(predictions.test.get("coverage", float("nan"))), 2),
                       "new digits flagged": float(flagged.get("scanner2", [0, 0])[0])})
    return counts


def verdict(rows: list[list[str]], columns: list[str], readme: Path = README,
            counts: dict[str, float] | None = None, section: str = "demo", spread: float = SPREAD_POINTS) -> str:
    """One line: the demo's figures against the README's (``section``'s table of the page ``readme``; the
    ``--imagenet`` demo's is docs/performance.md's ``imagenet``) and, given ``counts``, its quality and
    new-batch counts, which are compared for equality only: they move with the kernels, by no stated spread."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    table = readme_table(text, section)
    if table is None:
        return f"README check: no README with the demo's table at {readme} (an installed package): nothing to compare"
    printed, expected = figures(rows, columns), figures(markdown_rows(table), columns)
    off = beyond(printed, expected, spread)
    same = sum(printed.get(name) == value for name, value in expected.items())
    if off:
        line = (f"README check: {len(off)} of {len(expected)} top-1 figures beyond the README's ±{spread:g} "
                f"points: " + "; ".join(off))
    elif same == len(expected):
        line = f"README check: all {len(expected)} top-1 figures equal the README's"
    else:
        line = (f"README check: all {len(expected)} top-1 figures within the README's ±{spread:g} points, "
                f"{len(expected) - same} not equal: this machine's kernels differ from the README's")
    if counts:
        stated = readme_counts(text)
        differ = [f"{name} {counts[name]:g} (README {value:g})" for name, value in stated.items()
                  if name in counts and counts[name] != value]
        line += ("; the quality and new-batch counts: " + (f"all {len(stated)} equal" if not differ else
                 f"{len(differ)} of {len(stated)} differ: " + ", ".join(differ)))
    return line + ("" if same == len(expected) and not off else " (docs/performance.md#reproducibility-across-cpus)")
