"""Scheduling and reruns against a real ``prefect server start`` on loopback."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import deployment_runs as _deployment_runs
from helpers import final_state, interrupt, served_deployment, write_config
from helpers import flow_run as _flow_run
from helpers import wait as _wait

pytestmark = [pytest.mark.slow, pytest.mark.server]

REPO = Path(__file__).resolve().parents[1]
HEADS = [{"kind": "logistic", "C": [1.0]}, {"kind": "knn", "k": [1, 3]}]


def _cli(server, *args: str, timeout: float = 1800, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=server.env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _task_runs(server, run_id: str) -> list[dict]:
    """Task runs of a flow run and of its subflow runs, at any depth."""
    ids, frontier = [run_id], [run_id]
    while frontier:
        children = server.api("POST", "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": frontier}}})
        frontier = [f["id"] for f in children]
        ids += frontier
    return server.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": ids}}})


def test_serve_registers_a_schedule_and_runs_a_triggered_run(prefect_server, tiny_config, tmp_path):
    cfg = tiny_config(heads=HEADS)
    config = write_config(cfg, tmp_path / "tiny.yaml")
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(config), "--cron", "0 3 * * *", "--name", "nightly"],
        cwd=REPO, env=prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="2"), stdout=log.open("wb"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        dep = served_deployment(prefect_server, "nightly", [log])
        schedules = [s["schedule"] for s in dep["schedules"]]
        assert [(s.get("cron"), s.get("timezone")) for s in schedules] == [("0 3 * * *", "UTC")]
        assert dep["parameters"] == {"config": str(config)}

        triggered = _cli(prefect_server, "prefect", "deployment", "run", "pipeline-from-config/nightly", timeout=1800)
        assert triggered.returncode == 0, triggered.stdout + triggered.stderr
        runs = _deployment_runs(prefect_server, dep["id"], auto_scheduled=False)
        assert len(runs) == 1
        run_id = runs[0]["id"]

        state = final_state(prefect_server, run_id, "the triggered run to finish", [log])
        assert state["type"] == "COMPLETED", f"{state}\n{log.read_text()[-4000:]}"
        names = {t["name"] for t in _task_runs(prefect_server, run_id)}
        assert {"extract-resnet18-train", "head-logistic-penultimate", "evaluate-tiny"} <= names
        assert list((cfg.cache_dir / "runs" / "tiny").glob("*/report.md"))
        # anyone who reaches the loopback API can ask for a run: with another config it is refused, nothing runs
        marker = tmp_path / "pwned"
        evil = tmp_path / "evil.yaml"
        import yaml

        hostile = yaml.safe_load(config.read_text())
        hostile["backbone"] = {"source": "python", "name": "os:system", "kwargs": {"command": f"touch {marker}"},
                               "weights": "DEFAULT", "preprocess": hostile["backbone"]["preprocess"]}
        evil.write_text(yaml.safe_dump(hostile))
        asked = _cli(prefect_server, "prefect", "deployment", "run", "pipeline-from-config/nightly", "--param",
                     f"config={evil}", timeout=1800)
        assert asked.returncode == 0, asked.stdout + asked.stderr
        refused_id = next(r["id"] for r in _deployment_runs(prefect_server, dep["id"], auto_scheduled=False)
                          if r["id"] != run_id)

        state = final_state(prefect_server, refused_id, "the run with another config to be refused", [log])
        assert state["type"] == "FAILED" and "serves config" in state["message"], state
        assert not marker.exists()
        upcoming = _wait("the scheduler to create the nightly runs",
                         lambda: _deployment_runs(prefect_server, dep["id"], auto_scheduled=True), 1800)
        assert all(r["expected_start_time"][11:16] == "03:00" for r in upcoming)
    finally:
        interrupt(serve)


def test_serve_refuses_without_a_server_and_names_bad_schedules(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    config = write_config(tiny_config(heads=HEADS), tmp_path / "tiny.yaml")
    runner = CliRunner()
    no_server = runner.invoke(app, ["serve", str(config), "--interval", "60"], env={"PREFECT_API_URL": ""})
    assert no_server.exit_code == 2 and "needs a Prefect server" in no_server.output
    assert "prefect server start" in no_server.output
    bad_cron = runner.invoke(app, ["serve", str(config), "--cron", "0 3 * *"])
    assert bad_cron.exit_code == 2 and "--cron '0 3 * *'" in bad_cron.output
    bad_interval = runner.invoke(app, ["serve", str(config), "--interval", "0"])
    assert bad_interval.exit_code == 2 and "--interval 0.0: must be a positive" in bad_interval.output


def test_prefect_yaml_deploys_the_same_pipeline_to_a_process_pool(prefect_server):
    pool = _cli(prefect_server, "prefect", "work-pool", "create", "transferpipe", "--type", "process", timeout=1800)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = _cli(prefect_server, "prefect", "--no-prompt", "deploy", "--all", timeout=1800)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    dep = prefect_server.api("GET", "/deployments/name/pipeline-from-config/digits-nightly")
    assert dep["entrypoint"] == "flows/operations/serve.py:pipeline_from_config" and dep["work_pool_name"] == "transferpipe"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert (REPO / dep["parameters"]["config"]).exists()


def test_prefect_flow_run_retry_reruns_only_the_failed_stage_and_what_follows(prefect_server, tiny_config, tmp_path):
    """`transferpipe run` fails in fine-tuning (injected fault); `prefect flow-run retry` finishes the same run."""
    import json

    cfg = tiny_config(name="retried", heads=[{"kind": "logistic", "C": [1.0]}],
                      finetune={"enabled": True, "epochs": 2, "batch_size": 4, "num_workers": 0})
    config = write_config(cfg, tmp_path / "retried.yaml")
    failed = _cli(prefect_server, "flows.cli", "run", str(config), TRANSFERPIPE_FAULTS="finetune.epoch:2:raise")  # after epoch 1 (0 is the probe)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "stage finetune-resnet18 failed: injected fault at finetune.epoch" in failed.stderr
    runs = [r for r in prefect_server.api("POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["pipeline"]}}})
            if r["name"] == "run-retried"]
    assert len(runs) == 1 and runs[0]["state"]["type"] == "FAILED"
    assert "stage finetune-resnet18 failed" in runs[0]["state"]["message"]

    retried = _cli(prefect_server, "prefect", "flow-run", "retry", runs[0]["id"],
                   "--entrypoint", "flows/pipeline.py:pipeline_flow")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert _flow_run(prefect_server, runs[0]["id"])["state"]["type"] == "COMPLETED"
    states: dict[str, list[str]] = {}
    for t in sorted(_task_runs(prefect_server, runs[0]["id"]), key=lambda t: t["start_time"] or ""):
        states.setdefault(t["name"], []).append(t["state"]["name"])
    assert states["extract-resnet18-train"] == ["Completed", "Cached"]  # no forward pass on the retry
    assert states["head-logistic-penultimate"] == ["Completed", "Cached"]  # no head fit on the retry
    assert states["finetune-resnet18"] == ["Failed", "Completed"]
    assert states["evaluate-retried"] == ["Completed"]
    saved = json.loads(next(cfg.cache_dir.glob("finetune/*/result.json")).read_text())
    assert saved["resumed_from"] == 1  # the retry resumed fine-tuning after the checkpointed epoch


def test_a_run_killed_with_kill_9_is_marked_crashed_by_the_next_command(prefect_server, tiny_config, tmp_path):
    """CLI runs keep no heartbeat; the next command against the same server marks a killed one Crashed."""
    path = write_config(tiny_config(name="killed", heads=HEADS), tmp_path / "killed.yaml")  # its own run names
    killed = _cli(prefect_server, "flows.cli", "run", str(path), TRANSFERPIPE_FAULTS="extract.batch:2:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    runs = prefect_server.api("POST", "/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["run-killed"]}}})
    assert [r["state"]["type"] for r in runs] == ["RUNNING"]
    again = _cli(prefect_server, "flows.cli", "run", str(path))
    assert again.returncode == 0, again.stderr
    assert "marked crashed: run-killed" in again.stderr + again.stdout
    states = {r["id"]: r["state"]["type"] for r in
              prefect_server.api("POST", "/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["run-killed"]}}})}
    assert states[runs[0]["id"]] == "CRASHED" and sorted(states.values()) == ["COMPLETED", "CRASHED"]


def test_a_server_lost_mid_run_ends_the_run_in_one_line_within_seconds(tiny_config, tmp_path):
    """Prefect's client retried a lost server for ~6 minutes before `[Errno 111] Connection refused`."""
    from flows.execution.server import start_server, stop_server

    server, proc = start_server()
    path = write_config(tiny_config(name="lost", heads=HEADS), tmp_path / "lost.yaml")
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=REPO, text=True,
                           env=server.env(TRANSFERPIPE_FAULTS="extract.batch:2:delay=300"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait("an extraction in progress", lambda: list((tmp_path / "cache" / "features").rglob("*.h5.partial")), 1800)
    finally:
        stop_server(server, proc)
    stopped = time.monotonic()
    out, err = run.communicate(timeout=1800)
    assert run.returncode == 1, err
    assert time.monotonic() - stopped < 45
    errors = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"the Prefect server at {server.url} refuses connections" in errors[0], errors
    assert "Traceback" not in err


def test_stopping_one_of_two_serves_leaves_the_deployment_served_and_a_rename_replaces_it(prefect_server,
                                                                                        tiny_config, tmp_path):
    """Issue 43: stopping one of two `serve` processes paused the shared deployment (deleting its scheduled runs)
    while the other kept serving; automations outlived every serve; a --name change added another automation."""
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "c.log"]

    def serve(name: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(config), "--name", name, "--cron",
                                 "0 3 * * *", "--on-data-change"], cwd=REPO, env=prefect_server.env(),
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)

    def automations(dep: dict) -> list[dict]:
        return prefect_server.api("GET", f"/automations/related-to/prefect.deployment.{dep['id']}")

    registry = prefect_server.home / "transferpipe-serve" / "pair"
    first, second = serve("pair", logs[0]), serve("pair", logs[1])
    try:
        dep = served_deployment(prefect_server, "pair", logs)
        _wait("both serve processes", lambda: len(list(registry.iterdir())) == 2 or None, 1800, logs)
        _wait("the trigger's automation", lambda: automations(dep) or None, 1800, logs)
        interrupt(first)
        now = prefect_server.api("GET", f"/deployments/{dep['id']}")
        assert not now["paused"] and all(a["enabled"] for a in automations(dep)), logs[0].read_text()[-3000:]
        assert "stays active: 1 other serve process(es) serve it" in logs[0].read_text()
        interrupt(second)
        assert prefect_server.api("GET", f"/deployments/{dep['id']}")["paused"]
        assert automations(dep) and not any(a["enabled"] for a in automations(dep))  # no runs nobody runs

        renamed = serve("renamed", logs[2])
        new = served_deployment(prefect_server, "renamed", logs)
        _wait("the old name to be replaced", lambda: not prefect_server.api(
            "POST", "/deployments/filter", json={"deployments": {"name": {"any_": ["pair"]}}}) or None, 1800, logs)
        _wait("the renamed trigger", lambda: automations(new) or None, 1800, logs)
        assert not prefect_server.api("GET", f"/deployments/{new['id']}")["paused"]
        assert automations(dep) == []  # the old deployment's automation went with it
    finally:
        for proc in (first, second, locals().get("renamed")):
            if proc is not None and proc.poll() is None:
                interrupt(proc)
