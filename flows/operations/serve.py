"""Scheduled pipelines: a Prefect deployment of one config, served from this process.

A deployment's parameters must be JSON, so the deployed flow takes the config
*file* and reads it when a run starts: edit the YAML and the next scheduled
run uses it (unchanged stages stay cache hits, since keys are content).

Schedules live on a Prefect server. Ephemeral mode (no ``PREFECT_API_URL``)
cannot schedule, so :func:`serve` refuses to start without a server.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from prefect import flow

from flows.config import ConfigError, load_config
from flows.defaults import DEFAULT_PORT
from flows.pipeline import PipelineResult, pipeline_flow

DEPLOYED_FLOW = "pipeline-from-config"
log = logging.getLogger("transferpipe.serve")


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"scheduled-{Path(flow_run.parameters['config']).stem}"


#: set by :func:`serve` in the serving process (and the flow-run processes it starts): the one config file and
#: cache folder its deployment may run. The Prefect API on loopback takes no credentials, so a run's parameters
#: come from anyone who can reach it; this process-local record cannot be changed through the API.
SERVED_ENV = "TRANSFERPIPE_SERVED"


def check_served(config: str, cache_dir: str | None) -> None:
    """Refuse a run of the served deployment with another config file or cache folder than the one served."""
    import json

    served = os.environ.get(SERVED_ENV)
    if not served:
        return  # not started by `transferpipe serve` (a direct call, or a worker's deployment: see the README)
    allowed = json.loads(served)
    asked = {"config": str(Path(config).resolve()),
             "cache_dir": None if cache_dir is None else str(Path(cache_dir).expanduser().resolve())}
    for field, value in asked.items():
        if value != allowed[field]:
            raise ConfigError(f"this deployment serves {field} {allowed[field]!r} only; a run asked for {value!r}: "
                              "refused (serve another config with its own `transferpipe serve`)")


@flow(name=DEPLOYED_FLOW, flow_run_name=_run_name)
def pipeline_from_config(config: str, cache_dir: str | None = None) -> PipelineResult:
    """The whole pipeline for the experiment config at ``config`` (a YAML path), read at run time; when served,
    only the config and cache folder it was served with (:func:`check_served`)."""
    check_served(config, cache_dir)
    return pipeline_flow(load_config(config, cache_dir))


def schedules(cron: list[str], interval: list[float], timezone: str | None = None) -> list:
    """Prefect schedules from ``--cron`` and ``--interval`` values; a bad one is a ConfigError naming it."""
    from prefect.schedules import Cron, Interval, validate_cron_string

    out = []
    for expr in cron:
        try:
            validate_cron_string(expr)
        except ValueError as exc:
            raise ConfigError(f"--cron {expr!r}: {exc}; expected five fields, e.g. '0 3 * * *' (03:00 daily)") from None
        out.append(Cron(expr, timezone=timezone or "UTC"))
    for seconds in interval:
        if not seconds > 0:
            raise ConfigError(f"--interval {seconds!r}: must be a positive number of seconds")
        out.append(Interval(timedelta(seconds=seconds), timezone=timezone or "UTC"))
    return out


def require_server(why: str = "transferpipe serve needs a Prefect server (ephemeral mode cannot schedule runs)") -> str:
    """The Prefect API URL; schedules cannot live in ephemeral mode, so without one this says how to start one."""
    url = os.environ.get("PREFECT_API_URL") or _configured_url()
    if not url:  # the server `transferpipe server start` left running, as `run` finds it
        from flows.execution.server import remembered

        server = remembered()
        if server:
            os.environ["PREFECT_API_URL"] = url = server.url
    if not url:
        raise ConfigError(
            f"{why}: start one with "
            f"`transferpipe server start` (or `prefect server start` and PREFECT_API_URL=http://127.0.0.1:{DEFAULT_PORT}/api)"
        )
    return url


def _configured_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def serve(
    config: Path, *, name: str | None = None, cron: list[str] = (), interval: list[float] = (),
    timezone: str | None = None, cache_dir: Path | None = None, paused: bool = False, on_data_change: bool = False,
) -> None:
    """Register ``pipeline-from-config/<name>`` with its schedules (and with ``on_data_change`` a trigger on
    ``transferpipe watch``'s events, flows/operations/watch.py) and run its flow runs until interrupted."""
    from prefect.deployments.runner import EntrypointType

    cfg = load_config(config, cache_dir)  # fail fast on a bad config, before anything is registered
    wanted = schedules(list(cron), list(interval), timezone)
    url = require_server()
    import json

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.operations.watch import trigger

    parameters = {"config": str(Path(config).resolve())}
    if cache_dir is not None:
        parameters["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
    os.environ[SERVED_ENV] = json.dumps({"config": parameters["config"], "cache_dir": parameters.get("cache_dir")})
    name = name or cfg.name
    with temporary_settings({PREFECT_API_URL: url}), serving(name):  # the remembered server too
        replace_renamed(name, parameters)
        pipeline_from_config.serve(
            name=name, schedules=wanted or None, paused=paused, parameters=parameters,
            triggers=[trigger(cfg)] if on_data_change else None,
            description=f"transferpipe pipeline for {parameters['config']}", tags=["transferpipe"],
            entrypoint_type=EntrypointType.MODULE_PATH, pause_on_shutdown=False,  # serving() pauses, last one out
        )


@contextlib.contextmanager
def serving(name: str) -> Iterator[None]:
    """This process as one server of deployment ``name``, in ``$PREFECT_HOME/transferpipe-serve/``: when the last
    one on this machine stops, the deployment and its automations are paused (Prefect's own pause-on-shutdown
    paused them, and deleted the scheduled runs, when any one server stopped while others went on serving)."""
    from prefect.settings import get_current_settings

    folder = Path(get_current_settings().home).expanduser() / "transferpipe-serve" / name
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / str(os.getpid())
    mine.write_text(name)
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)
        others = live_servers(folder)
        if others:
            log.info("deployment %s/%s stays active: %d other serve process(es) serve it", DEPLOYED_FLOW, name,
                     len(others))
        else:
            _pause(name)


def live_servers(folder: Path) -> list[Path]:
    """The serve processes registered in ``folder`` that still run; the files of killed ones are removed."""
    alive = []
    for entry in (folder.iterdir() if folder.is_dir() else ()):
        try:
            os.kill(int(entry.name), 0)
            alive.append(entry)
        except PermissionError:  # another user's process: running
            alive.append(entry)
        except (ValueError, ProcessLookupError):
            entry.unlink(missing_ok=True)  # left by a serve that was killed
    return alive


def _pause(name: str) -> None:
    """Pause the deployment (no more scheduled runs) and its automations (no runs from events nobody runs)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{DEPLOYED_FLOW}/{name}")
        client.pause_deployment(deployment.id)
        for automation in client.read_resource_related_automations(f"prefect.deployment.{deployment.id}"):
            client.pause_automation(automation.id)
    log.info("deployment %s/%s and its automations paused: the last serve process stopped (serving it again "
             "resumes both)", DEPLOYED_FLOW, name)


def replace_renamed(name: str, parameters: dict[str, str]) -> None:
    """Delete the deployments (and their automations) that served this same config and cache folder under another
    name and that no process on this machine serves now: a rename replaces, it does not add a deployment whose
    trigger starts runs nobody runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home).expanduser() / "transferpipe-serve"
    with get_client(sync_client=True) as client:
        for old in client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[DEPLOYED_FLOW]))):
            same = {k: old.parameters.get(k) for k in ("config", "cache_dir")} == {
                "config": parameters["config"], "cache_dir": parameters.get("cache_dir")}
            served = bool(live_servers(home / old.name))
            if same and old.name != name and not served:
                client.delete_resource_owned_automations(f"prefect.deployment.{old.id}")
                client.delete_deployment(old.id)
                log.info("deployment %s/%s (the same config under its old name) replaced by %s", DEPLOYED_FLOW,
                         old.name, name)
