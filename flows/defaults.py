"""Defaults that several commands share, each spelled once; cheap to import (the CLI reads them first).

- the cache folder: ``--cache-dir`` beats ``$TRANSFERPIPE_CACHE_DIR``, which beats the
  config's ``cache_dir``, which defaults to ``~/.cache/transferpipe``;
- the local Prefect server's port on 127.0.0.1.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRANSFERPIPE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/transferpipe")
CACHE_DIR_HELP = f"Cache folder; beats ${CACHE_ENV} and the config's cache_dir (default {DEFAULT_CACHE_DIR})."
DEFAULT_PORT = 4200


def cache_dir_override(flag: str | Path | None = None) -> Path | None:
    """The cache folder the command line or the environment imposes (``--cache-dir``, then ``$TRANSFERPIPE_CACHE_DIR``)."""
    chosen = flag or os.environ.get(CACHE_ENV)
    return Path(chosen).expanduser().absolute() if chosen else None


def default_cache_dir(flag: str | Path | None = None) -> Path:
    """The cache folder when no config is given: the override, else the default."""
    return cache_dir_override(flag) or DEFAULT_CACHE_DIR.expanduser().absolute()
