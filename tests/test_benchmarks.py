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
from concurrent.futures import Future, ThreadPoolExecutor
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
def quick_runs(tmp_path_factory, request) -> dict[str, Future]:
    """Every benchmark's ``--quick`` run, two at a time (most of each is process and Prefect start-up, waiting more
    than computing: about 1½ minutes less than one by one on 2 cores). They share one Prefect home apart from the
    session's (whose run names are other tests' evidence), so its database is made once."""
    home = tmp_path_factory.mktemp("benchmarks-prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "TRANSFERPIPE_"))}
    env.update(PREFECT_HOME=str(home), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def run(name: str) -> subprocess.CompletedProcess:
        tmp = tmp_path_factory.mktemp(f"bench-{name}")
        return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=REPO,
                              env={**env, "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=600)

    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_quick_run"}  # `-k` runs only what it selects
    # the longest first, so the two lanes end together
    order = sorted(selected, key=lambda n: ("cli", "scale_out", "scale", "rerun").index(n)
                   if n in ("cli", "scale_out", "scale", "rerun") else 9)
    with ThreadPoolExecutor(2) as pool:
        yield {name: pool.submit(run, name) for name in order}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_quick_run(name: str, quick_runs: dict[str, Future]):
    done = quick_runs[name].result()
    assert done.returncode == 0, f"benchmarks.{name} --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2 and any(ch.isdigit() for ch in done.stdout), done.stdout
