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


def local_run_settings():
    """Settings for a run without a Prefect server (ephemeral mode).

    The flow heartbeat exists to detect crashed runs on a server; locally it
    only costs time, so it is off unless ``PREFECT_API_URL`` points at a server.
    """
    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def run_local(flow_fn, *args: Any, **kwargs: Any) -> Any:
    """Run a flow in this process (Prefect's ephemeral mode unless PREFECT_API_URL names a server)."""
    with local_run_settings():
        return flow_fn(*args, **kwargs)
