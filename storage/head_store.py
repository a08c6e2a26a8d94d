"""Trained heads on disk: arrays in safetensors + a JSON description. Never pickle.

``<cache_dir>/heads/<key>/`` holds ``arrays.safetensors`` and ``head.json``
(format, kind, hyperparameters, classes, feature keys, validation metrics and
the sha256 of the arrays file). A head directory appears by an atomic rename,
complete or not at all; a head whose arrays do not match their checksum is
refused by name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from storage.keys import canonical_json, file_sha256, short
from storage.atomic import as_created
from storage.layout import CacheLayout
from storage.records import read_json, set_aside

HEAD_FORMAT = "transferpipe-head"
HEAD_FORMAT_VERSION = 1
DAMAGED = "DAMAGED"  # written into a head's folder when its arrays fail their checksum


class CorruptArtifact(RuntimeError):
    """A head artifact that is incomplete or does not match its checksum."""


def head_dir(cache_dir: str | Path, key: str) -> Path:
    return CacheLayout(cache_dir).head(key)


def head_exists(cache_dir: str | Path, key: str) -> bool:
    """Whether a sound head is stored under ``key``: both files, readable, and arrays of the size written."""
    return head_problem(cache_dir, key) is None


def head_problem(cache_dir: str | Path, key: str) -> str | None:
    """Why the head stored under ``key`` cannot be used, as far as a stat and its description tell; None if it can."""
    folder = head_dir(cache_dir, key)
    arrays = folder / "arrays.safetensors"
    if not folder.is_dir():
        return "missing"
    meta = read_json(folder / "head.json")
    if not isinstance(meta, dict) or not arrays.is_file():
        return "incomplete (head.json unreadable or arrays missing)"
    if (folder / DAMAGED).is_file():
        return (folder / DAMAGED).read_text()
    if "arrays_bytes" in meta and arrays.stat().st_size != meta["arrays_bytes"]:
        return f"damaged ({arrays.stat().st_size} bytes of arrays, {meta['arrays_bytes']} written)"
    return None


def _set_aside(cache_dir: str | Path, key: str, why: str) -> Path:
    return set_aside(head_dir(cache_dir, key), CacheLayout(cache_dir).heads() / ".quarantine", why)


def save_head(cache_dir: str | Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a head atomically; if another run wrote the same key first, keep theirs (same content)."""
    target = head_dir(cache_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and (why := head_problem(cache_dir, key)):
        _set_aside(cache_dir, key, why)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{short(key)}-"))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "arrays.safetensors"))
        description = {
            "format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "key": key,
            "arrays_sha256": file_sha256(tmp / "arrays.safetensors"),
            "arrays_bytes": (tmp / "arrays.safetensors").stat().st_size, **meta,
        }
        (tmp / "head.json").write_text(json.dumps(json.loads(canonical_json(description)), indent=1))
        os.rename(as_created(tmp), target)
    except Exception:  # noqa: BLE001 - a full disk fails inside safetensors too: never leave the temp folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not head_exists(cache_dir, key):
            raise
    return target


def read_meta(cache_dir: str | Path, key: str) -> dict[str, Any]:
    path = head_dir(cache_dir, key) / "head.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifact(f"{path}: unreadable ({exc})") from exc
    if meta.get("format") != HEAD_FORMAT or meta.get("format_version") != HEAD_FORMAT_VERSION or meta.get("key") != key:
        raise CorruptArtifact(f"{path}: not a transferpipe head v{HEAD_FORMAT_VERSION} for key {short(key)}")
    return meta


def load_head_arrays(cache_dir: str | Path, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The description and arrays of a head, after checking the arrays' sha256."""
    meta = read_meta(cache_dir, key)
    path = head_dir(cache_dir, key) / "arrays.safetensors"
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise CorruptArtifact(f"{path}: unreadable ({exc})") from exc
    if actual != meta["arrays_sha256"]:
        why = f"checksum mismatch (stored {short(meta['arrays_sha256'])}, actual {short(actual)})"
        (head_dir(cache_dir, key) / DAMAGED).write_text(why)  # read by head_problem: the next run retrains it
        raise CorruptArtifact(f"{path}: {why}; the next run sets it aside and trains it again")
    return meta, load_file(str(path))
