"""New data in, a run out: ``transferpipe watch`` announces changes once the data is quiet, and a deployment
served with ``--on-data-change`` runs on the event (against a real ``prefect server`` on loopback)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import deployment_runs as _deployment_runs
from helpers import (
    final_state,
    interrupt,
    make_image,
    make_imagefolder,
    served_deployment,
    write_config,
)
from helpers import wait as _wait

from flows.operations import watch

REPO = Path(__file__).resolve().parents[1]


class Scripted:
    """A clock and a sleep for :func:`flows.operations.watch.watch`: each poll advances the clock and runs that poll's
    action (a file dropped), so the debounce is checked without real waiting."""

    def __init__(self, actions: dict[int, callable]):
        self.now, self.poll, self.actions = 0.0, 0, actions

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.poll += 1
        if self.poll in self.actions:
            self.actions[self.poll]()


def test_a_burst_of_new_files_is_one_announcement_after_the_quiet_period(tiny_config, tmp_path):
    root = make_imagefolder(tmp_path / "data", n_per_class=2)
    cfg = tiny_config(data={"root": str(root)})
    drop = lambda name: lambda: make_image(root / "class0" / name, 0, 7)  # noqa: E731
    script = Scripted({2: drop("a.png"), 3: drop("b.png"), 4: drop("c.png"),  # a burst, one poll apart
                       12: lambda: (root / "class1" / "000.png").unlink()})
    said = []
    n = watch.watch(cfg, every=1, quiet=3, announce=said.append, polls=20, clock=script.clock, sleep=script.sleep)
    assert n == 2 and [s["added_count"] for s in said] == [3, 0] and [s["removed_count"] for s in said] == [0, 1]
    assert [Path(p).name for p in said[0]["added"]] == ["a.png", "b.png", "c.png"]
    assert said[0]["experiment"] == cfg.name and said[1]["removed"] == [str(root / "class1" / "000.png")]
    (root / "class0" / "partial.png.tmp").write_bytes(b"x")  # a writer in progress is not data yet
    (root / ".hidden").write_bytes(b"x")
    assert watch.snapshot(watch.watched(cfg)).keys() == watch.snapshot([root]).keys()
    assert not any(p.endswith((".tmp", ".hidden")) for p in watch.snapshot([root]))


def test_watch_refuses_without_a_server(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    refused = CliRunner().invoke(app, ["watch", str(config)], env={"PREFECT_API_URL": ""})
    assert refused.exit_code == 2 and "transferpipe watch needs a Prefect server" in refused.output


@pytest.mark.slow
@pytest.mark.server
def test_a_new_image_runs_the_served_pipeline_which_extracts_only_its_piece(prefect_server, tiny_config, tmp_path):
    from storage import results as registry

    root = make_imagefolder(tmp_path / "data", n_per_class=8, splits=("train", "test"))
    cfg = tiny_config(data={"root": str(root)}, extract={"piece_size": 4}, heads=[{"kind": "knn", "k": [1]}])
    config = write_config(cfg, tmp_path / "tiny.yaml")
    env = prefect_server.env(PREFECT_RUNNER_POLL_FREQUENCY="2")
    first = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, env=env, text=True,
                           capture_output=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {r["run_key"] for r in registry.query(cfg.cache_dir)}
    pieces = lambda: set(cfg.cache_dir.rglob("pieces/*.h5"))  # noqa: E731 - every extracted piece's file
    extracted = pieces()
    logs = [tmp_path / "serve.log", tmp_path / "watch.log"]
    served = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", str(config), "--name", "on-data",
                               "--on-data-change"], cwd=REPO, env=env, stdout=logs[0].open("wb"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    watching = None
    try:
        dep = served_deployment(prefect_server, "on-data", logs)
        assert not dep["schedules"]

        def automation():  # the trigger lives on the server as an automation that runs the deployment
            return [a for a in prefect_server.api("POST", "/automations/filter", json={})
                    if any(act.get("deployment_id") == dep["id"] for act in a["actions"])]

        (auto,) = _wait("the deployment's trigger", automation, 1800, logs)
        assert auto["trigger"]["expect"] == [watch.EVENT]
        assert auto["trigger"]["match"] == {"prefect.resource.id": watch.resource_id(cfg)}
        watching = subprocess.Popen([sys.executable, "-m", "flows.cli", "watch", str(config), "--every", "0.5",
                                     "--quiet", "2"], cwd=REPO, env=env, stdout=logs[1].open("wb"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _wait("the watcher to start", lambda: "watching" in logs[1].read_text(), 1800, logs)
        shutil.copy2(root / "train/class1/003.png", root / "train/class0/new.png")  # new data lands
        runs = _wait("a run started by the event", lambda: _deployment_runs(prefect_server, dep["id"], False), 1800,
                     logs)

        state = final_state(prefect_server, runs[0]["id"], "the triggered run to finish", logs)
        assert state["type"] == "COMPLETED", f"{state}\n{logs[0].read_text()[-4000:]}"
        assert "event transferpipe.data.changed on the server" in logs[1].read_text()  # read back by its id
        assert len(pieces() - extracted) == 1  # only the piece holding the new image was extracted
        assert {r["run_key"] for r in registry.query(cfg.cache_dir)} - before  # a new evaluation in the registry
        assert len(_deployment_runs(prefect_server, dep["id"], False)) == 1  # one event, one run
    finally:
        for proc in (p for p in (watching, served) if p is not None):
            interrupt(proc, timeout=120)


def test_a_name_that_is_not_utf8_is_announced_escaped_not_dropped(tiny_config, tmp_path):
    """Prefect drops an event whose payload JSON cannot encode (it logs a traceback; watch said "sent")."""
    import json
    import os

    root = make_imagefolder(tmp_path / "data", n_per_class=2)
    cfg = tiny_config(data={"root": str(root)})
    odd = os.fsdecode(os.fsencode(str(root / "class0")) + b"/caf\xe9.png")
    script = Scripted({2: lambda: Path(odd).write_bytes((root / "class0" / "000.png").read_bytes())})
    said = []
    watch.watch(cfg, every=1, quiet=2, announce=said.append, polls=6, clock=script.clock, sleep=script.sleep)
    assert [s["added"] for s in said] == [[str(root / "class0") + "/caf\\xe9.png"]]
    json.dumps(said[0], ensure_ascii=False).encode("utf-8")  # what Prefect sends: no surrogate left


def test_the_baseline_survives_the_watcher_and_advances_only_when_the_server_took_the_event(tiny_config, tmp_path):
    """A change made while no watcher ran, or pending when it was killed, or refused by a server that is down,
    is announced by the next look: at least once."""
    root = make_imagefolder(tmp_path / "data", n_per_class=2)
    cfg = tiny_config(data={"root": str(root)})
    state = tmp_path / "cache" / "watch" / "tiny.json"
    said, down = [], [True]

    def announce(body):
        if down[0]:
            down[0] = False
            raise watch.NotAnnounced("the server is down")
        said.append(body)

    script = Scripted({2: lambda: make_image(root / "class0" / "a.png", 0, 7)})
    n = watch.watch(cfg, every=1, quiet=2, announce=announce, polls=8, clock=script.clock, sleep=script.sleep,
                    state=state)
    assert n == 1 and [s["added_count"] for s in said] == [1]  # refused once, announced at the next look
    make_image(root / "class0" / "b.png", 0, 8)  # while no watcher runs
    said.clear()
    script = Scripted({})
    assert watch.watch(cfg, every=1, quiet=2, announce=said.append, polls=4, clock=script.clock,
                       sleep=script.sleep, state=state) == 1
    assert [Path(p).name for p in said[0]["added"]] == ["b.png"]  # a.png was announced already
    script = Scripted({})
    assert watch.watch(cfg, every=1, quiet=2, announce=said.append, polls=4, clock=script.clock,
                       sleep=script.sleep, state=state) == 0  # nothing new: nothing said


def test_a_file_that_never_settles_is_announced_after_the_longest_wait(tiny_config, tmp_path, caplog):
    import logging

    root = make_imagefolder(tmp_path / "data", n_per_class=2)
    cfg = tiny_config(data={"root": str(root)})
    log_file = root / "class0" / "growing.png"
    script = Scripted({i: (lambda i=i: log_file.write_bytes(b"x" * i)) for i in range(2, 40)})  # every second
    said = []
    with caplog.at_level(logging.WARNING, logger="transferpipe.watch"):
        n = watch.watch(cfg, every=1, quiet=3, announce=said.append, polls=30, clock=script.clock,
                        sleep=script.sleep, max_wait=10)
    assert n == 2 and said[0]["added"] == [str(log_file)]  # after 10 s of writing, not never
    script = Scripted({3: lambda: __import__("shutil").rmtree(root / "class2")})
    with caplog.at_level(logging.WARNING, logger="transferpipe.watch"):
        watch.watch(tiny_config(data={"root": str(root / "class2")}), every=1, quiet=1, announce=said.append,
                    polls=6, clock=script.clock, sleep=script.sleep)
    assert sum("class2 is gone" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow  # waits out its confirmation time
def test_an_event_the_server_never_got_is_not_announced(tiny_config, tmp_path):
    """emit_event returns as if sent when the server is down; the read-back by id says it is not there."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/api"  # nothing listens once the socket is closed
    cfg = tiny_config()
    with temporary_settings({PREFECT_API_URL: closed}):
        announce = watch.emit(cfg, closed, confirm_s=3)
        with pytest.raises(watch.NotAnnounced, match="has no event .* after 3s"):
            announce({"added_count": 1, "removed_count": 0, "changed_count": 0})
