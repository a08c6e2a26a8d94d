"""Prefect flows, the CLI and the experiment config: wiring only, no maths, no file formats.

Prefect reads these settings from the environment, so they are set (as
defaults a user can override) before Prefect is first imported.
"""
import os

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
}.items():
    os.environ.setdefault(_name, _value)
