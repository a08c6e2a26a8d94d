"""What every command shares: the config argument, loading a config before Prefect starts, and running a
flow on the local ephemeral server (or the configured one) with the cache folder checked first."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
SweepFile = Annotated[Optional[Path], typer.Option(
    "--sweep", help="Sweep file (grid or list of overrides); the config's own sweep: section otherwise.")]


def run_local(flow_fn, *args, **kwargs):
    from flows.execution.local import run_local, writable

    for arg in args:  # the cache folder a flow writes to, named before anything starts
        cache = arg if isinstance(arg, Path) else getattr(arg, "cache_dir", None)
        if isinstance(cache, Path):
            writable(cache, "the cache folder", "choose one with --cache-dir or cache_dir: in the config")
    return run_local(flow_fn, *args, **kwargs)


def pipeline(config: Path, cache_dir: Path | None, stop_after: str, cfg=None):
    """The pipeline flow for a config (loaded here unless given), up to a stage."""
    cfg = cfg or load(config, cache_dir)
    from flows.pipeline import pipeline_flow

    return cfg, run_local(pipeline_flow, cfg, stop_after=stop_after)


def load(config: Path, cache_dir: Path | None):
    """Validate the config before Prefect starts: bad input fails fast with one line."""
    from flows.config import load_config

    return load_config(config, cache_dir=cache_dir)


def setup_logging() -> None:
    """Stage logs at INFO; Prefect gives the ``transferpipe`` logger its handlers inside runs."""
    logging.getLogger("transferpipe").setLevel(logging.INFO)
