"""Prefect flows, the CLI and the experiment config: wiring only, no maths, no file formats.

By role:

- ``config.py`` (and ``config_errors.py``): the experiment config, composed from the stages' sections;
  ``defaults.py``: the cache folder and other defaults every entry point shares;
- ``pipeline.py``: the pipeline flow (the entry point deployments name); ``notebook.py``: the Python API;
- ``planning/``: the experiment graph: which stages a run executes, in which order, and ``plan``;
- ``execution/``: the stages as Prefect tasks, their records, GPU slots, Dask workers, the server a run talks
  to (ephemeral or ``server start``'s), artifacts;
- ``experiments/``: flows made of pipeline runs: sweeps, the demo, backbone selection;
- ``operations/``: served deployments and the data watcher;
- ``cli/``: the ``transferpipe`` command and what it prints.

The floors, each importing only those below it (tests/test_architecture.py checks it): defaults -> config ->
execution -> planning -> pipeline, notebook -> experiments, operations -> cli.

Prefect reads these settings from the environment, so they are set (as
defaults a user can override) before Prefect is first imported; so are the CPU kernels
``$TRANSFERPIPE_KERNELS`` pins (``tasks.machine.pin_kernels``), before numpy and torch load.
"""
import os

from tasks.machine import pin_kernels

pin_kernels()

for _name, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no analytics heartbeat from the server
    "DO_NOT_TRACK": "1",  # no client telemetry
    # a fresh ephemeral server took 16-17 s to start on 2 idle cores, minutes at load 10-19; Prefect's
    # default timeout is 20 s. The wait ends when it answers: a long limit only matters when it never does
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "transferpipe",  # stage logs appear in flow-run logs
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # stages also run (and log) outside flows
    # a failed flow run's exception is stored in $PREFECT_HOME/storage: as JSON, never pickle
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
    # a run's report artifact carries its plots inline (up to 1 MiB each): the server's event of it is bigger than
    # Prefect's 1.5 MB default, which it refused with a WARNING in every demo (the artifact itself was kept)
    "PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES": str(16 * 2**20),
}.items():
    os.environ.setdefault(_name, _value)


def _route_logs_to_runs() -> None:
    """transferpipe's lines in each run's logs on the server, also when Prefect was imported (and set up its
    logging) before this package: a served deployment's runner, `prefect deploy`, a notebook. Prefect reads
    PREFECT_LOGGING_EXTRA_LOGGERS once, at that set-up, so it missed the default above; this gives the
    ``transferpipe`` logger the handlers Prefect gives its extra loggers (those of ``prefect.extra``, once) and
    their level (PREFECT_LOGGING_LEVEL)."""
    import logging
    import sys

    ours = logging.getLogger("transferpipe")
    if ours.level == logging.NOTSET:  # else the root's WARNING: the stages' INFO lines would not pass
        level = os.environ.get("PREFECT_LOGGING_LEVEL", "INFO").upper()
        ours.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)
    if "prefect.logging.configuration" not in sys.modules:
        return  # Prefect sets up later and reads the setting itself
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)


_route_logs_to_runs()
