"""Where the cache lives when no config says: cheap to import (the CLI reads it before anything heavy)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TRANSFERPIPE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/transferpipe")


def default_cache_dir(flag: str | Path | None = None) -> Path:
    """The cache folder when no config is given: ``--cache-dir``, else ``$TRANSFERPIPE_CACHE_DIR``, else the default."""
    chosen = flag or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser().absolute()
