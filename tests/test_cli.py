"""The CLI answers at once: help, cache ls and results import neither torch nor Prefect."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from typer.testing import CliRunner
from flows.cli import app
runner = CliRunner()
for args in {commands!r}:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
heavy = sorted(m for m in ("torch", "torchvision", "prefect", "sklearn") if m in sys.modules)
print("heavy:", ",".join(heavy))
"""


@pytest.mark.parametrize("commands", [
    [["--help"]],
    [[cmd, "--help"] for cmd in ("extract", "heads", "finetune", "run", "serve", "results", "select", "demo",
                                 "server", "cache", "predict", "export-model")],
    [["cache", "ls", "--cache-dir", "{tmp}"], ["results", "--cache-dir", "{tmp}"], ["cache", "gc", "--cache-dir", "{tmp}"]],
], ids=["help", "help-of-every-command", "cache-and-results"])
def test_fast_commands_import_neither_torch_nor_prefect(commands, tmp_path):
    commands = [[a.replace("{tmp}", str(tmp_path)) for a in args] for args in commands]
    done = subprocess.run([sys.executable, "-c", PROBE.format(commands=commands)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "heavy:", done.stdout


@pytest.mark.slow
@pytest.mark.server
def test_the_local_server_starts_is_reused_by_later_commands_and_stops(tiny_config, tmp_path):
    import socket

    from helpers import write_config

    from flows.execution.server import PrefectServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=1800)

    started = cli("server", "start", "--port", str(port), "--retention-days", "14")
    try:
        assert started.returncode == 0 and f"started: http://127.0.0.1:{port}/api" in started.stdout, started
        assert f"UI: http://127.0.0.1:{port} " in started.stdout and "over 14 days ago" in started.stdout
        settings = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=tmp_path / "home",
                                 log=tmp_path / "log").api("GET", "/admin/settings")
        vacuum = settings["server"]["services"]["db_vacuum"]  # what the running server itself was given
        assert set(vacuum["enabled"]) == {"events", "flow_runs"} and vacuum["retention_period"] == "P14D"  # ISO 8601
        import httpx  # the UI calls the API where the UI's settings say: this server's port, not 4200 (issue 49)

        ui = httpx.get(f"http://127.0.0.1:{port}/ui-settings", timeout=30).json()
        assert ui["api_url"] == f"http://127.0.0.1:{port}/api", ui
        again = cli("server", "start", "--port", str(port))
        assert "already running" in again.stdout
        status = cli("server", "status")
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
        config = write_config(tiny_config(heads=[{"kind": "knn", "k": [1]}]), tmp_path / "tiny.yaml")
        ran = cli("run", str(config))
        assert ran.returncode == 0, ran.stderr
        server = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=tmp_path / "home", log=tmp_path / "log")
        runs = server.api("POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["pipeline"]}}})
        assert [r["name"] for r in runs] == ["run-tiny"] and runs[0]["state"]["type"] == "COMPLETED"
    finally:
        stopped = cli("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert cli("server", "status").returncode == 1
    assert not server.healthy()


LOAD = """
import sys
from flows.config import parse_config
from tasks.extract import plan_extraction
cfg = parse_config({raw!r})
plan_extraction(cfg.data, cfg.backbone, cfg.extract, cfg.cache_dir)
import flows.pipeline  # what a run imports before its first task
print("heavy:", ",".join(sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules)))
"""


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_a_config_seen_before_loads_and_plans_without_torch(imagefolder, tmp_path):
    """What torchvision says about a backbone is remembered in the cache: the second load needs no torch."""
    raw = {"name": "x", "data": {"source": "imagefolder", "root": str(imagefolder)}, "cache_dir": str(tmp_path / "c"),
           "backbone": {"name": "resnet18", "weights": "none", "layers": ["penultimate", "layer3"]}}
    runs = [subprocess.run([sys.executable, "-c", LOAD.format(raw=raw)], cwd=REPO, capture_output=True, text=True,
                           timeout=1800) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert runs[0].stdout.strip() == "heavy: torch,torchvision"  # the first time asks torchvision
    assert runs[1].stdout.strip() == "heavy:"
    # model name, module names, preprocessing, which layers are channels-last
    assert len(list((tmp_path / "c" / "backbones").glob("*.json"))) == 4


@pytest.mark.slow
def test_every_table_reads_at_80_columns(imagefolder, tmp_path, monkeypatch):
    """What a user reads in an 80 x 24 terminal: no line longer than 80, every row on one line with its values
    whole (rich folded 13 columns into 4-character fragments: ``resn/et18``, ``0.6/10``). In one process (the
    console at 80 columns, as ``COLUMNS=80`` makes it): seven subprocesses took 147 s, mostly Prefect start-ups."""
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.cli.console import err, out

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-at-eighty-columns",
        "data": {"source": "imagefolder", "root": str(imagefolder), "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}},
        "extract": {"batch_size": 4, "num_workers": 0},
        "heads": [{"kind": "logistic", "shots": [1, "all"], "seeds": 2}, {"kind": "knn", "name": "knn-cosine"}],
        "finetune": {"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0, "early_stopping": None},
        "cache_dir": str(tmp_path / "cache"), "retries": 0,
    }))
    for console in (out, err):
        monkeypatch.setattr(console, "_width", 80)
        monkeypatch.setattr(console, "_height", 24)
    wanted = {
        ("extract",): ["train", "val", "test"],
        ("heads",): ["logistic", "knn-cosine"],
        ("run",): ["logistic", "knn-cosine", "finetuned"],
        ("finetune",): ["0 (probe)"],
        ("export",): ["train", "test"],
        ("results",): ["tiny-at-eighty-columns", "resnet18"],
        ("cache", "ls"): ["resnet18", "complete"],
    }
    for command, values in wanted.items():
        args = [*command, *([str(config)] if command[0] not in ("results", "cache") else []),
                "--cache-dir", str(tmp_path / "cache")]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (command, result.output)
        # a path is printed whole, to be copied: alone on its line or ending it ("feature files: /...")
        lines = [ln for ln in result.stdout.splitlines() if " " in ln.strip() and not ln.split()[-1].startswith("/")]
        assert max(map(len, lines)) <= 80, (command, result.stdout)
        for value in values:  # each row on one line, its values whole
            assert any(value in line for line in lines), (command, value, result.stdout)
        fragments = [ln for ln in lines if ln.strip() and len(ln.strip()) <= 4]
        assert not fragments, (command, result.stdout)


@pytest.mark.parametrize("days", ["nan", "inf", "1e9", "-1", "0.01"])
def test_a_retention_that_is_not_a_number_of_days_prefect_keeps_is_one_line_naming_the_option(days, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["server", "start", "--port", "1", "--retention-days", days],
                                env={"PREFECT_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert f"--retention-days {float(days):g}: give a number of days from 0.05" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3


def test_stopping_a_server_this_process_started_does_not_wait_on_its_zombie():
    """A stopped server stays a zombie until its parent reaps it, and a zombie keeps its process group alive:
    every stop of a server this process started waited out the SIGTERM and SIGKILL windows (30 s; the suite paid
    it per worker and per test server). Here the windows are an hour: only the reaping lets the stop return."""
    import threading

    from flows.execution.server import _stop_group

    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    stopper = threading.Thread(target=_stop_group, args=(proc.pid, 3600), kwargs={"child": proc}, daemon=True)
    stopper.start()
    stopper.join(timeout=120)
    alive = stopper.is_alive()
    if alive:
        proc.kill()
    assert not alive and proc.returncode == -signal.SIGTERM
