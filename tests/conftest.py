"""Shared fixtures: tiny synthetic images, an isolated Prefect home, RNG restore (helpers: helpers.py)."""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

# Before anything imports Prefect: a private home (its SQLite database and result
# records) for the whole session, no telemetry, and no user cache dir leaking in.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="transferpipe-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("TRANSFERPIPE_CACHE_DIR", None)
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# pytest-xdist's workers (pyproject's -n 2) share the cores: one thread each for torch, OpenMP and BLAS, in the
# worker and the commands it starts. Two workers of two threads each fought over 2 cores: the fast loop took
# 1:48 and 198 CPU-s, with one thread 1:04 and 109 (one worker, two threads: 1:34 and 101). A test whose
# numbers depend on the thread count (the README's demo, the pinned kernels) sets or drops it itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_imagefolder  # noqa: E402

@pytest.fixture(autouse=True)
def _restore_rng():
    """Tests may seed freely; the next test sees the RNG state it would have seen."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "images")


TINY_BACKBONE = {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}}


@pytest.fixture
def tiny_config(tmp_path: Path, imagefolder: Path):
    """An experiment on 18 tiny images through a random resnet18 at 32 px."""
    from flows.config import parse_config

    def make(**over):
        raw = {
            "name": "tiny",
            "data": {"source": "imagefolder", "root": str(imagefolder), "val_fraction": 0.2, "test_fraction": 0.2},
            "backbone": TINY_BACKBONE,
            "extract": {"batch_size": 4, "num_workers": 0},
            "cache_dir": str(tmp_path / "cache"),
            "retries": 0,
        }
        for section, value in over.items():
            raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
        return parse_config(raw)

    return make


#: ``finetune:`` of the tiny fine-tunes (3 epochs of 3 batches)
FT = {"enabled": True, "epochs": 3, "batch_size": 4, "num_workers": 0, "augment": "crop", "warmup_epochs": 0.5,
      "early_stopping": None}


@pytest.fixture
def staged(tiny_config):
    """Features and a logistic probe on the tiny dataset; returns a plan factory for fine-tuning."""
    from helpers import split_plans
    from tasks.backbones.config import resolve
    from tasks.extract.stage import extract_split
    from tasks.finetune.plan import FinetuneConfig, FinetunePlan, plan_finetune
    from tasks.heads.plan import plan_heads
    from tasks.heads.stage import best_probe, train_head

    cfg = tiny_config(heads=[{"kind": "logistic", "C": [0.1, 1.0]}])
    feats = {s: extract_split(p) for s, p in split_plans(cfg).items()}
    heads = [train_head(p) for p in plan_heads(cfg.heads, feats["train"].key, feats["val"].key, cfg.cache_dir)]
    probe = best_probe(cfg.cache_dir, [r.key for h in heads for r in h.records])

    def plan(cache_dir=None, **over) -> FinetunePlan:
        ft = FinetuneConfig(**{**FT, **over})
        return plan_finetune(ft, resolve(cfg.backbone), feats["train"].manifest, Path(cache_dir or cfg.cache_dir),
                             {s: r.key for s, r in feats.items()}, [probe])

    return cfg, feats, probe, plan


@pytest.fixture(scope="session", autouse=True)
def _stop_ephemeral_prefect_server():
    """Stop Prefect's ephemeral server while pytest's streams are still open.

    Otherwise it stops at interpreter exit and logs to closed streams.
    """
    yield
    if "prefect" not in sys.modules:  # tests that need no Prefect ran alone (on a lent GPU machine, without it)
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()


@pytest.fixture(scope="session")
def prefect_server():
    """A real ``prefect server start`` on loopback (own home, SQLite), shared by the tests that need one."""
    from flows.execution.server import start_server, stop_server

    server, proc = start_server()
    try:
        yield server
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # logs of runs this process sent to the server, before it goes
        EventsWorker.drain_all(timeout=10)
        stop_server(server, proc)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), where mounting is allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
