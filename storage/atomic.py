"""Small files written atomically: a reader sees the old file or the whole new one, never a torn one.

Files and folders made here get the permissions the user's umask gives (not
the 0600/0700 of Python's temporary files), so a cache can be shared by a team.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # no /proc: read it by setting it back at once
        os.umask(mask)
        return mask


UMASK = _read_umask()


def as_created(path: Path) -> Path:
    """Give a file or folder made through ``tempfile`` the mode a plain ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)
    return path


def room_problem(path: Path, needed: int, current: int = 0) -> str | None:
    """Why ``needed`` more bytes cannot be written to ``path`` (now ``current`` bytes): not enough free space on
    its disk, or past the process's file size limit (``ulimit -f``); None when they fit. Checked before a
    write whose failure mid-way is hard to report (torch's ``unexpected pos``) or to recover (an HDF5 flush)."""
    import resource
    import shutil

    free = shutil.disk_usage(path.parent).free
    if free < needed:
        return (f"not enough disk space in {path.parent}: {free / 2**20:.1f} MiB free, "
                f"{needed / 2**20:.1f} MiB needed")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and current + needed > limit:
        return (f"{path} would grow to {(current + needed) / 2**20:.1f} MiB, past this process's file size "
                f"limit of {limit / 2**20:.1f} MiB (ulimit -f)")
    return None


def write_text(path: Path, text: str) -> Path:
    """``text`` to ``path`` through a temporary file in the same folder and a rename (unique per writer).

    A failed write (a full disk, a file size limit) removes its temporary file and names the target.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as fh:
        tmp = Path(fh.name)
        try:
            fh.write(text)
            fh.flush()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    os.replace(as_created(tmp), path)
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_text(path, json.dumps(value))
