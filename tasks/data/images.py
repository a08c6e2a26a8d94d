"""The one decode path from an item's bytes to an RGB image (extraction, fine-tuning and evaluation), header
checks before compute, and the DataLoader worker settings.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from tasks.data.config import get

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and float images are rescaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode(data: IO[bytes]) -> Image.Image:
    """The one decode path: an item's encoded bytes to 8-bit RGB, decoded fully (a truncated file fails here)."""
    with Image.open(data) as img:
        img.load()
        return to_rgb(img)


def read_image(source: str, root: Path, item: str, options: dict[str, str] | None = None) -> Image.Image:
    """One dataset item, opened by its source and decoded (extraction, fine-tuning and evaluation read this)."""
    with get(source).open(root, item, options or {}) as fh:
        return decode(fh)


def load_rgb(path: Path) -> Image.Image:
    """An image file outside any dataset (a path), decoded like every item."""
    with open(path, "rb") as fh:
        return decode(fh)



def worker_init(_worker_id: int) -> None:
    """Drop the parent's thread-exit hooks in a forked DataLoader worker.

    Prefect 3.8 registers one per service; after fork it resets the service but
    the hook stays and fails an assert at exit, so the worker exits with code 1
    and the DataLoader reports it as crashed. A worker never needs them.
    """
    import threading

    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def num_workers_for(setting: int | str, n_batches: int) -> int:
    """DataLoader workers: ``auto`` is 0 for tiny jobs, else cores - 1 (at most 8).

    A daemonic process (a Dask worker started with its default settings) may not
    have children, so it decodes in-process whatever the setting.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        if setting not in ("auto", 0):
            logging.getLogger("transferpipe.data").warning("num_workers=%s ignored: this process is daemonic (a Dask worker?) and cannot start "
                        "DataLoader workers; start the Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False",
                        setting)
        return 0
    if setting != "auto":
        return int(setting)
    if n_batches < 4:  # starting workers costs more than it saves
        return 0
    return min(8, max(1, (os.cpu_count() or 1) - 1))
