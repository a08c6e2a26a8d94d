"""One job per GPU: the device's global concurrency limit on a real ``prefect server`` on loopback, checked on
the CPU in test mode (TRANSFERPIPE_GUARD_CPU=1: the CPU is guarded as if it were one GPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_config

from flows.execution import device_slots

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import json, sys, time
from flows.execution.device_slots import device_slot
with device_slot("cpu", "test") as name:
    print(json.dumps({"name": name, "entered": time.time()}), flush=True)
    time.sleep(float(sys.argv[1]))
    left = time.time()
print(json.dumps({"left": left}), flush=True)
"""


def _hold(server, seconds: float, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server.env(TRANSFERPIPE_GUARD_CPU="1", **env))


def _lines(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return {k: v for line in out.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


def test_only_cuda_or_the_guarded_cpu_take_a_slot(monkeypatch):
    monkeypatch.delenv(device_slots.GUARD_ENV, raising=False)
    assert device_slots.slot_name("cpu") is None  # CPU stages never wait
    monkeypatch.setenv(device_slots.GUARD_ENV, "1")
    assert device_slots.slot_name("cpu") == f"cpu-{device_slots.host()}"
    assert device_slots.host().replace("-", "").isalnum()


def test_without_a_server_the_section_runs_unguarded(monkeypatch):
    monkeypatch.setenv(device_slots.GUARD_ENV, "1")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with device_slots.device_slot("cpu", "test") as name:
        assert name is None


def test_a_lease_shorter_than_prefect_allows_is_refused_before_asking(monkeypatch):
    monkeypatch.setenv(device_slots.GUARD_ENV, "1")
    monkeypatch.setenv(device_slots.LEASE_ENV, "5")
    with pytest.raises(ValueError, match="TRANSFERPIPE_SLOT_LEASE_S=5: .* at least 60 s"):
        with device_slots.device_slot("cpu", "test"):
            pass


@pytest.mark.slow
@pytest.mark.server
def test_two_runs_never_overlap_in_the_guarded_section_and_a_killed_one_frees_it(prefect_server):
    first, second = _hold(prefect_server, 3), _hold(prefect_server, 3)
    a, b = _lines(first), _lines(second)
    assert a["name"] == b["name"] == f"cpu-{device_slots.host()}"
    (_, end_a), (start_b, _) = sorted([(a["entered"], a["left"]), (b["entered"], b["left"])])
    assert end_a <= start_b  # one after the other, whichever came first
    limit = prefect_server.api("GET", f"/v2/concurrency_limits/{a['name']}")
    assert limit["limit"] == 1 and limit["active_slots"] == 0

    held = _hold(prefect_server, 3600, TRANSFERPIPE_SLOT_LEASE_S="60")  # takes the slot, is killed
    line = next((text for text in held.stdout if text.startswith("{")), "")  # once it holds the slot
    assert line and json.loads(line)["name"] == a["name"], held.stderr.read()[-3000:]
    os.kill(held.pid, signal.SIGKILL)
    held.wait()
    killed_at = time.time()
    after = _lines(_hold(prefect_server, 0))  # waits until the lease runs out and the server frees the slot
    assert after["entered"] >= killed_at


@pytest.mark.slow
@pytest.mark.server
def test_an_extraction_on_the_guarded_device_holds_its_slot(prefect_server, tiny_config, tmp_path):
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    ran = subprocess.run([sys.executable, "-m", "flows.cli", "extract", str(config)], cwd=REPO, capture_output=True,
                         text=True, timeout=1800, env=prefect_server.env(TRANSFERPIPE_GUARD_CPU="1"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    logged = ran.stdout + ran.stderr
    assert f"took cpu-{device_slots.host()}" in logged and f"releases cpu-{device_slots.host()}" in logged
    again = subprocess.run([sys.executable, "-m", "flows.cli", "extract", str(config)], cwd=REPO, capture_output=True,
                           text=True, timeout=1800, env=prefect_server.env(TRANSFERPIPE_GUARD_CPU="1"))
    assert again.returncode == 0 and "took cpu-" not in again.stdout + again.stderr  # stored: no slot taken
