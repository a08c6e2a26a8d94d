"""A real ``prefect server start`` on loopback, with its own home and SQLite.

Used by the tests and benchmarks that need a server, and by ``transferpipe server``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 120


@dataclass
class PrefectServer:
    url: str  # the API URL, ends in /api
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a subprocess that talks to this server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home), PREFECT_API_URL=self.url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="INFO", **extra,
        )
        return env

    def api(self, method: str, path: str, **kwargs) -> dict | list:
        response = httpx.request(method, f"{self.url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path | None = None, port: int | None = None,
                 scheduler_loop_s: float = 2) -> tuple[PrefectServer, subprocess.Popen]:
    """Start a server in its own process group and wait until it is healthy.

    ``home``: its PREFECT_HOME (default: a new temporary folder); ``scheduler_loop_s``:
    how often its scheduler creates runs (Prefect's default is 60 s).
    """
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="transferpipe-server-"))
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    server = PrefectServer(url=f"http://127.0.0.1:{port}/api", home=home, log=home / "server.log")
    env = server.env()
    env.pop("PREFECT_API_URL")
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = str(scheduler_loop_s)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off", "--no-ui"],
        env=env, stdout=server.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server, proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server, proc)
    raise RuntimeError(f"prefect server not healthy after {START_TIMEOUT_S}s:\n{server.log.read_text()[-3000:]}")


def stop_server(server: PrefectServer, proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (uvicorn and its services), then remove its (temporary) home."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    shutil.rmtree(server.home, ignore_errors=True)
