"""``transferpipe serve`` and ``watch``: the pipeline as a deployment on a Prefect server, and the watcher whose
events start its runs."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from flows.cli.console import CacheDir, friendly_errors
from flows.cli.running import ConfigArg


@friendly_errors
def serve(
    config: ConfigArg,
    cron: Annotated[list[str], typer.Option("--cron", help="Cron schedule, e.g. '0 3 * * *' (repeatable).")] = [],
    interval: Annotated[list[float], typer.Option("--interval", help="Run every N seconds (repeatable).")] = [],
    timezone: Annotated[Optional[str], typer.Option("--timezone", help="Schedule time zone, e.g. Europe/Berlin (UTC).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Deployment name (default: the experiment name).")] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Register the schedule paused.")] = False,
    on_data_change: Annotated[bool, typer.Option(
        "--on-data-change", help="Also run when `transferpipe watch` announces new data for this config.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Deploy the pipeline on a Prefect server with a schedule and run its flow runs until Ctrl-C.

    Needs a server (PREFECT_API_URL); trigger a run by hand with
    `prefect deployment run pipeline-from-config/NAME`.
    """
    from flows.operations.serve import serve as serve_config

    serve_config(config, name=name, cron=cron, interval=interval, timezone=timezone, cache_dir=cache_dir,
                 paused=paused, on_data_change=on_data_change)


@friendly_errors
def watch(
    config: ConfigArg,
    every: Annotated[float, typer.Option("--every", min=0.1, help="Seconds between looks at the data.")] = 10.0,
    quiet: Annotated[float, typer.Option("--quiet", min=0, help="Seconds the data must stay unchanged before a "
                                                                 "change is announced (one event per burst).")] = 30.0,
    max_wait: Annotated[float, typer.Option("--max-wait", min=0, help="Seconds after which a change that never "
                                            "settles (a file rewritten all the time) is announced anyway.")] = 300.0,
) -> None:
    """Announce new, removed or changed data files as a Prefect event (transferpipe.data.changed) until Ctrl-C;
    a deployment served with --on-data-change runs on each. At least once: what was announced is kept in the
    cache and a change is announced again until the server has it. Needs a server (PREFECT_API_URL or
    `transferpipe server start`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import load_config
    from flows.operations.serve import require_server
    from flows.operations.watch import emit, watch as watch_data
    from storage.layout import CacheLayout

    cfg = load_config(config)
    url = require_server("transferpipe watch needs a Prefect server (its events start the served deployment's runs)")
    with temporary_settings({PREFECT_API_URL: url}):  # the remembered server too, not only PREFECT_API_URL's
        watch_data(cfg, every, quiet, emit(cfg, url), max_wait=max_wait,
                   state=CacheLayout(cfg.cache_dir).watch_state(cfg.name))
