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
from storage.layout import CacheLayout

HEAD_FORMAT = "transferpipe-head"
HEAD_FORMAT_VERSION = 1


class CorruptArtifact(RuntimeError):
    """A head artifact that is incomplete or does not match its checksum."""


def head_dir(cache_dir: str | Path, key: str) -> Path:
    return CacheLayout(cache_dir).head(key)


def head_exists(cache_dir: str | Path, key: str) -> bool:
    folder = head_dir(cache_dir, key)
    return (folder / "head.json").is_file() and (folder / "arrays.safetensors").is_file()


def save_head(cache_dir: str | Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write a head atomically; if another run wrote the same key first, keep theirs (same content)."""
    target = head_dir(cache_dir, key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{short(key)}-"))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "arrays.safetensors"))
        description = {
            "format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "key": key,
            "arrays_sha256": file_sha256(tmp / "arrays.safetensors"), **meta,
        }
        (tmp / "head.json").write_text(json.dumps(json.loads(canonical_json(description)), indent=1))
        os.rename(tmp, target)
    except OSError:
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
        raise CorruptArtifact(f"{path}: checksum mismatch (stored {short(meta['arrays_sha256'])}, actual {short(actual)})")
    return meta, load_file(str(path))
