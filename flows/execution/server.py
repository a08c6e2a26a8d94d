"""A real ``prefect server start`` on loopback, on SQLite: temporary ones for tests and benchmarks,
and the persistent local one that ``transferpipe server start`` leaves running for later commands.

The persistent server is started in its own session with its log in a file,
rather than with ``prefect server start --background``: that mode keeps the
server's stdout and stderr as pipes nobody reads, so a chatty server can block
once the pipe fills, and it shares the terminal's process group.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flows.defaults import DEFAULT_PORT

START_TIMEOUT_S = 600  # ends when the server answers (about 20 s idle; minutes on a busy machine)
STATE_FILE = "transferpipe-server.json"


@dataclass
class PrefectServer:
    url: str  # the API URL, ends in /api
    home: Path
    log: Path
    pid: int | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that talks to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home), PREFECT_API_URL=self.url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="INFO", **extra,
        )
        return env

    def api(self, method: str, path: str, **kwargs) -> dict | list:
        import httpx

        response = httpx.request(method, f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def healthy(self, timeout: float = 2) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


#: flow runs a persistent server keeps (ended this many days ago or less); older ones are vacuumed
RETENTION_DAYS = 30


def vacuum_env(retention_days: float) -> dict[str, str]:
    """Prefect's database vacuum for a long-lived home: every hour, flow runs that ended more than
    ``retention_days`` ago are deleted with their task runs, logs and artifacts (and events after Prefect's 7
    days). Results stay: they are files in $PREFECT_HOME/storage, and the stages' outputs are in the cache."""
    return {"PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(int(retention_days * 86400))}


def start_server(home: Path | None = None, port: int | None = None, scheduler_loop_s: float | None = 2,
                 log: Path | None = None, extra_env: dict[str, str] | None = None) -> tuple[PrefectServer, subprocess.Popen]:
    """Start a server in its own process session and wait until it is healthy.

    ``home``: its PREFECT_HOME (default: a new temporary folder); ``scheduler_loop_s``:
    how often its scheduler creates runs (None: Prefect's default, 60 s); ``extra_env``: settings of the
    server process (:func:`vacuum_env`).
    """
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="transferpipe-server-"))
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=home, log=log or home / "server.log")
    env = server.env(**(extra_env or {}))
    env.pop("PREFECT_API_URL")
    # the UI calls the API where this says (Prefect's default: port 4200, whatever --port says); a user's own
    # setting (a proxy in front) wins
    env["PREFECT_SERVER_UI_API_URL"] = (os.environ.get("PREFECT_SERVER_UI_API_URL")
                                        or os.environ.get("PREFECT_UI_API_URL") or server.url)
    if scheduler_loop_s is not None:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(scheduler_loop_s)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off"],
        env=env, stdout=server.log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    server.pid = proc.pid
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
        if server.healthy():
            return server, proc
        time.sleep(0.5)
    stop_server(server, proc)
    raise RuntimeError(f"prefect server not healthy after {START_TIMEOUT_S}s:\n{server.log.read_text()[-3000:]}")


def _stop_group(pid: int, wait_s: float = 20, child: subprocess.Popen | None = None) -> None:
    """SIGTERM the server's process group (uvicorn and its services), SIGKILL if it outlives ``wait_s``.

    ``child``: the server when this process started it, reaped as soon as it exits (unreaped, its zombie kept
    the group alive: every stop waited the full 20 + 10 s)."""
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def stop_server(server: PrefectServer, proc: subprocess.Popen) -> None:
    """Stop a temporary server started by :func:`start_server`, then remove its home."""
    if proc.poll() is None:
        _stop_group(proc.pid, child=proc)
        proc.wait(timeout=10)
    shutil.rmtree(server.home, ignore_errors=True)


# --------------------------------------------------------------------------- the persistent local server


def prefect_home() -> Path:
    """Prefect's home as Prefect resolves it by default (``$PREFECT_HOME`` or ``~/.prefect``), without importing it."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _state_path() -> Path:
    return prefect_home() / STATE_FILE


def remembered() -> PrefectServer | None:
    """The server ``transferpipe server start`` left running, if it answers."""
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    server = PrefectServer(url=state["url"], home=Path(state["home"]), log=Path(state["log"]), pid=state["pid"])
    return server if server.healthy(timeout=1) else None


MAX_RETENTION_DAYS = 36_500


def check_retention(days: float) -> None:
    """From an hour (Prefect keeps flow runs at least that long) to 100 years (past it Prefect's date arithmetic
    overflows); nan and inf are neither."""
    if not 1 / 24 <= days <= MAX_RETENTION_DAYS:
        raise ValueError(f"--retention-days {days:g}: give a number of days from 0.05 (an hour, the least Prefect "
                         f"keeps flow runs) to {MAX_RETENTION_DAYS:,} (100 years)")


def start_persistent(port: int = DEFAULT_PORT, retention_days: float = RETENTION_DAYS) -> tuple[PrefectServer, bool]:
    """The persistent local server: the running one, or a new one on ``port`` with the database vacuum on
    (:func:`vacuum_env`); True when it was started now."""
    check_retention(retention_days)
    running = remembered()
    if running:
        return running, False
    if _port_taken(port):
        raise ValueError(f"port {port} on 127.0.0.1 is taken by another program; choose one with --port")
    home = prefect_home()
    server, _ = start_server(home, port, scheduler_loop_s=None, log=home / "transferpipe-server.log",
                             extra_env=vacuum_env(retention_days))
    _state_path().write_text(json.dumps({**asdict(server), "home": str(home), "log": str(server.log)}))
    return server, True


def stop_persistent() -> PrefectServer | None:
    """Stop the persistent server (if one is remembered) and forget it; returns what was stopped."""
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    _stop_group(int(state["pid"]))
    _state_path().unlink(missing_ok=True)
    return PrefectServer(url=state["url"], home=Path(state["home"]), log=Path(state["log"]), pid=state["pid"])
