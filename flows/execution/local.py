"""Running flows from this process: run names, and settings for Prefect's ephemeral mode."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any


def experiment_run_name(prefix: str):
    """A ``flow_run_name`` callable: ``<prefix>-<experiment name>``, read from the run's ``config`` parameter."""

    def name() -> str:
        from prefect.runtime import flow_run

        cfg = flow_run.parameters["config"]
        return f"{prefix}-{cfg['name'] if isinstance(cfg, dict) else cfg.name}"

    return name


HEARTBEAT_ENV = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def local_run_settings(server_url: str | None = None):
    """Settings for a run in this process: against ``server_url``, or without a server (ephemeral mode).

    The flow heartbeat exists to detect crashed runs that nobody watches. A run
    started here is watched: its command fails in the user's shell. Prefect's
    heartbeat thread sleeps in 1 s steps and the engine waits for it at the end
    of every flow run (~0.7 s measured), so it is off for these runs unless
    ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` asks for it. Deployments served by
    ``transferpipe serve`` or a worker keep Prefect's default.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    updates: dict[Any, Any] = {}
    if not any(os.environ.get(name) for name in HEARTBEAT_ENV):
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    if server_url:
        updates[PREFECT_API_URL] = server_url
    return temporary_settings(updates) if updates else contextlib.nullcontext()


def run_local(flow_fn, *args: Any, **kwargs: Any) -> Any:
    """Run a flow for a shell command in this process: on PREFECT_API_URL's server, else on the local server that
    ``transferpipe server start`` left running, else in Prefect's ephemeral mode. A server that stops answering
    ends the command (:func:`_exit_when_server_lost`)."""
    from flows.execution.server import remembered

    url = os.environ.get("PREFECT_API_URL")
    server = None if url else remembered()
    if not url and not server:  # ephemeral mode: Prefect's database and server live in its home
        from prefect.settings import get_current_settings

        writable(Path(get_current_settings().home), "Prefect's home (PREFECT_HOME)",
                 "set PREFECT_HOME to a writable folder, or start a server (`transferpipe server start`)")
    if server:  # child processes (Dask workers) talk to it too
        os.environ["PREFECT_API_URL"] = url = server.url
    if url and _answer(url) == "refused":
        raise ServerLost(f"the Prefect server at {url} (PREFECT_API_URL) refuses connections: start it "
                         "(`transferpipe server start`), or unset PREFECT_API_URL to run without one")
    with local_run_settings(server.url if server else None), _tracebacks_to_the_server_only(), \
            _exit_when_server_lost(url):
        from prefect import tags

        mark_killed_runs_crashed()
        with tags(*_process_tags()):
            return flow_fn(*args, **kwargs)


def writable(folder: Path, what: str, fix: str) -> None:
    """``folder`` exists (made if needed) and takes a file; else one ValueError naming it, why and ``fix`` (before:
    a home that could not be created made the demo print 52 tracebacks over 4 minutes)."""
    import tempfile

    folder = folder.expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"{what} {folder} cannot be created or written ({exc.strerror or exc}): {fix}") from None


class ServerLost(RuntimeError):
    """The Prefect server a command runs against does not answer."""


SERVER_POLL_S = 5.0
LOST_AFTER_REFUSED, LOST_AFTER_ANY = 3, 12  # failed polls in a row: ~15 s refused, ~1-2 min of timeouts


def _answer(url: str, timeout: float = SERVER_POLL_S) -> str:
    """``ok``, ``refused`` (nothing listens: the server is gone) or ``silent`` (no answer in time, or an error)."""
    import httpx

    try:
        return "ok" if httpx.get(f"{url}/health", timeout=timeout).status_code == 200 else "silent"
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError:
        return "silent"


@contextlib.contextmanager
def _exit_when_server_lost(url: str | None):
    """End this process, in one line, when the server at ``url`` is gone.

    Prefect's client retries a lost server for minutes (measured: 6 min, then
    ``error: [Errno 111] Connection refused``), while a run that cannot record
    its states is over anyway. The cache survives ``kill -9`` at any point
    (tests/test_store.py, tests/test_finetune.py), so after a few refused polls
    in a row (~15 s), or a longer run of unanswered ones, a watcher thread says
    so and exits 1: every finished stage is in the cache for the rerun.
    """
    if not url:
        yield
        return
    import sys
    import threading

    done = threading.Event()

    def watch() -> None:
        refused = missed = 0
        while not done.wait(SERVER_POLL_S):
            answer = _answer(url)
            refused, missed = (refused + 1 if answer == "refused" else 0), (missed + 1 if answer != "ok" else 0)
            if (refused >= LOST_AFTER_REFUSED or missed >= LOST_AFTER_ANY) and not done.is_set():
                how = "refuses connections" if refused else "has not answered"
                sys.stderr.write(
                    f"error: the Prefect server at {url} {how} for {missed * SERVER_POLL_S:.0f} s, so this run "
                    "ends here. Every stage that finished is in the cache: start the server again (`transferpipe "
                    "server start`) and rerun; only what is missing computes\n")
                sys.stderr.flush()
                os._exit(1)

    watcher = threading.Thread(target=watch, name="transferpipe-server-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


HOST_TAG, PID_TAG = "transferpipe-host:", "transferpipe-pid:"


def _process_tags() -> tuple[str, str]:
    """Tags that say which process runs a flow run, so a later command can tell that it died."""
    import socket

    return f"{HOST_TAG}{socket.gethostname()}", f"{PID_TAG}{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mark_killed_runs_crashed() -> list[str]:
    """Flow runs started from a shell on this machine whose process is gone (``kill -9``, a lost machine) but
    that the server still shows RUNNING: set them Crashed. CLI runs keep no heartbeat (see
    :func:`local_run_settings`), so this is how the server learns. Returns the names of the runs marked."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host = _process_tags()[0]
    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                            tags=FlowRunFilterTags(all_=[host]))
    marked = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=running):
            pids = [int(t.removeprefix(PID_TAG)) for t in run.tags if t.startswith(PID_TAG)]
            if pids and not _alive(pids[0]):
                message = f"its process ({pids[0]} on this machine) ended without finishing it, e.g. killed"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                marked.append(run.name)
    if marked:
        logging.getLogger("transferpipe").warning("marked crashed: %s (their processes are gone)", ", ".join(marked))
    return marked


class _WithoutTraceback(logging.Formatter):
    """A console formatter that leaves out tracebacks (the record keeps them for the other handlers)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def _tracebacks_to_the_server_only():
    """A failed run started from the shell ends in one ``error:`` line: Prefect's console log keeps its lines but
    not their tracebacks (the server and its UI still get them). ``TRANSFERPIPE_DEBUG=1`` shows them."""
    if os.environ.get("TRANSFERPIPE_DEBUG"):
        yield
        return
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    handlers = {h for lg in loggers for h in getattr(lg, "handlers", []) if isinstance(h, PrefectConsoleHandler)}
    originals = {h: h.formatter for h in handlers}
    for handler, formatter in originals.items():
        handler.setFormatter(_WithoutTraceback(formatter or logging.Formatter()))
    try:
        yield
    finally:
        for handler, formatter in originals.items():
            handler.setFormatter(formatter)
