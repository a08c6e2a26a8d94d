"""Content fingerprints: the one place where cache keys are computed.

A key is the sha256 of the canonical JSON of everything that changes the bytes a
stage produces (DESIGN.md, "Cache keys"). Prefect's cache keys are derived from
these, never from hashing arrays or file handles.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Bump when the layout of a feature file changes: old files then get new keys.
FEATURE_FORMAT_VERSION = 1


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def manifest_fingerprint(
    root: str | Path,
    entries: Iterable[tuple[str, int]],
    classes: list[str],
    content: bool = False,
) -> str:
    """Fingerprint a list of ``(relative path, label)`` under ``root``.

    By default each file contributes its size and mtime (cheap, catches edits);
    ``content=True`` hashes the bytes instead (robust to copies and touch).
    """
    root = Path(root)
    rows = []
    for rel, label in entries:
        path = root / rel
        if content:
            ident: Any = file_sha256(path)
        else:
            st = path.stat()
            ident = [st.st_size, st.st_mtime_ns]
        rows.append([rel, int(label), ident])
    rows.sort()
    return fingerprint({"classes": list(classes), "files": rows, "mode": "content" if content else "stat"})


def feature_spec(
    *,
    backbone: str,
    weights: str,
    layers: list[str],
    pooling: str,
    preprocess: dict[str, Any],
    dataset: str,
    split: str,
    dtype: str,
) -> dict[str, Any]:
    """Everything that determines the bytes of one feature file (stored in its attrs)."""
    return {
        "backbone": backbone,
        "weights": weights,
        "layers": list(layers),
        "pooling": pooling,
        "preprocess": dict(preprocess),
        "dataset": dataset,
        "split": split,
        "dtype": dtype,
        "format_version": FEATURE_FORMAT_VERSION,
    }


def feature_key(spec: dict[str, Any]) -> str:
    return fingerprint({"kind": "features", **spec})


def short(key: str) -> str:
    """The first 12 hex digits: enough to name a key in tables and logs."""
    return key[:12]
