"""Running flows from this process: run names, and settings for Prefect's ephemeral mode."""
from __future__ import annotations

import contextlib
import os
from typing import Any


def experiment_run_name(prefix: str):
    """A ``flow_run_name`` callable: ``<prefix>-<experiment name>``, read from the run's ``config`` parameter."""

    def name() -> str:
        from prefect.runtime import flow_run

        cfg = flow_run.parameters["config"]
        return f"{prefix}-{cfg['name'] if isinstance(cfg, dict) else cfg.name}"

    return name


def local_run_settings(server_url: str | None = None):
    """Settings for a run in this process: against ``server_url``, or without a server (ephemeral mode).

    The flow heartbeat exists to detect crashed runs on a server; in ephemeral
    mode it only costs time, so it is off there.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if server_url:
        return temporary_settings({PREFECT_API_URL: server_url})
    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def run_local(flow_fn, *args: Any, **kwargs: Any) -> Any:
    """Run a flow in this process: on PREFECT_API_URL's server, else on the local server that
    ``transferpipe server start`` left running, else in Prefect's ephemeral mode."""
    from flows.server import remembered

    server = None if os.environ.get("PREFECT_API_URL") else remembered()
    if server:  # child processes (Dask workers) talk to it too
        os.environ["PREFECT_API_URL"] = server.url
    with local_run_settings(server.url if server else None):
        return flow_fn(*args, **kwargs)
