"""``transferpipe demo`` under each CPU kernel setting, against the README: how far its numbers move.

Each setting is one demo run as a user starts it (a subprocess, a fresh cache and Prefect home), the setting in its
environment; the reproducible one is the demo's default. Per setting: how many of the table's 26 top-1 figures
equal the README's, the largest move, the quality line's near-duplicate pairs and leaks, the new batch's
single-label sets and coverage, and the wall time as a ratio to the reproducible run. About 15 minutes on
2 cores; `python -m benchmarks.readme --only demo-kernels` rewrites docs/performance.md's table from it. Not
in the quick runs (each setting is a whole demo): tests/test_readme.py checks how it reads a demo's output.

    python -m benchmarks.demo_kernels
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.experiments import demo_check
from tasks.machine import KERNEL_PINS, KERNELS_ENV

REPO = Path(__file__).resolve().parents[1]
COLUMNS = demo_check.COLUMNS
#: name -> environment; each what another CPU or another thread count would pick
SETTINGS: dict[str, dict[str, str]] = {
    "reproducible (AVX2, 2 threads; the default)": {},
    "native (this CPU's best), 2 threads": {KERNELS_ENV: "native", "OMP_NUM_THREADS": "2"},
    "AVX2, 1 thread": {KERNELS_ENV: "reproducible", "OMP_NUM_THREADS": "1"},
    "no SIMD (ATen default, oneDNN SSE4.1), 2 threads": {
        KERNELS_ENV: "native", "ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OPENBLAS_CORETYPE": "Prescott", "OMP_NUM_THREADS": "2"},
}


def summary(stdout: str, readme: dict[str, float]) -> list[str]:
    """One demo's cells: equal figures, the largest move, pairs and leaks, single-label sets and coverage."""
    got = demo_check.figures(demo_check.markdown_rows(stdout), COLUMNS)
    moves = {name: abs(got.get(name, float("nan")) - value) * 100 for name, value in readme.items()}
    worst = max(moves, key=lambda name: moves[name])
    pairs = sum(int(n) for n in re.findall(r"(?:train|val|test|train-val|train-test|val-test) (\d+)",
                                           stdout.split("near-duplicate pairs:", 1)[-1].split("(", 1)[0]))
    leaks = re.search(r"leaks: (\d+) test image", stdout)
    batch = re.search(r"(\d+) single-label sets.*?at (\d\.\d+) test coverage", stdout, re.S)
    largest = "0" if moves[worst] == 0 else f"{moves[worst]:.1f} points ({worst.split(',')[0]})"
    return [f"{sum(m == 0 for m in moves.values())} of {len(readme)}", largest,
            f"{pairs}, {leaks.group(1) if leaks else '?'}", f"{batch.group(1)} at {batch.group(2)}" if batch else "?"]


def main() -> None:
    readme = demo_check.figures(demo_check.markdown_rows(demo_check.readme_table(demo_check.README.read_text())),
                                COLUMNS)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "TRANSFERPIPE_")) and k not in KERNEL_PINS["reproducible"]}
    rows, first = [], None
    for name, env in SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--markdown", "--cache-dir",
                                   f"{tmp}/cache"], cwd=REPO, env={**base, **env, "PREFECT_HOME": f"{tmp}/prefect"},
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"the demo failed under {name}:\n{done.stderr[-3000:]}")
        first = first or seconds
        rows.append([name, *summary(done.stdout, readme), f"{seconds:.0f} s ({seconds / first:.2f}x)"])
        print(f"{name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    print("**the demo under each kernel setting, against the README's numbers**\n")
    print("| kernels | top-1 figures equal to the README's | largest move | quality: near-duplicate pairs, leaks "
          "| new batch: single-label sets at coverage | wall time |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {' | '.join(row)} |")


if __name__ == "__main__":
    main()
