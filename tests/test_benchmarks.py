"""Every benchmark's ``--quick`` run, as a user would start it: none can rot unnoticed.

The benchmarks are discovered, not listed, so a new one is run here without
touching this file. Nothing asserts a time: a benchmark passes when it exits 0
and prints figures.
"""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import benchmarks

REPO = Path(__file__).resolve().parents[1]
# readme.py is not a benchmark: it rewrites README.md from full runs (tests/test_readme.py checks its demo table)
# gpu.py's quick run is tests/test_gpu.py's: it runs there with Prefect absent, as on a lent GPU machine
# demo_kernels.py is four whole demos (no quick form): tests/test_readme.py checks how it reads a demo's output
NAMES = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name not in ("readme", "gpu", "demo_kernels"))


def test_every_benchmark_is_found():
    assert {"cli", "extract", "finetune", "heads", "rerun", "scale", "scale_out", "select", "store"} <= set(NAMES)


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory) -> dict[str, str]:
    """The environment of the quick runs: one Prefect home apart from the session's (whose run names are other
    tests' evidence), so its database is made once per test worker; no server, no transferpipe settings."""
    home = tmp_path_factory.mktemp("benchmarks-prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "TRANSFERPIPE_"))}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_run(name: str, bench_env: dict[str, str], tmp_path):
    """Run as a user would, in a process of its own; the suite's workers (pytest-xdist) run two at a time."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=REPO,
                          env={**bench_env, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"benchmarks.{name} --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and any(ch.isdigit() for ch in done.stdout), done.stdout
