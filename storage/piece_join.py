"""Joining a split's pieces into its feature file, without copying.

Each piece is a complete file under ``features/pieces/`` (keyed by its own items,
so it can belong to several splits and dataset versions); the joined
``<key>.h5`` holds ``features/<layer>`` as HDF5 virtual datasets over them
(source paths relative to the features folder, so the cache can move), with
the checksums one file written in one go would have. Labels and row ids are
written from the split's manifest (a class added since a piece was computed
renumbers labels, not features). Readers see no difference.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from storage.h5file import (
    STRING, CorruptFeatureFile, bytes_view, check_invariants, fsync, json_attr, mark_used, open_h5, quarantine,
    values_checksum,
)
from storage.keys import canonical_json, short
from storage.layout import FeatureFiles

if TYPE_CHECKING:
    from storage.features import FeatureStore


def join_pieces(
    store: FeatureStore, key: str, pieces: list[Path], label_of: Mapping[str, int], *, spec: dict[str, Any],
    classes: list[str], versions: dict[str, str], batch_size: int, attrs: dict[str, str] | None = None,
    left_out: Sequence[dict[str, str]] = (),
) -> Path:
    """Join complete piece files (in row order) into ``<key>.h5`` without copying features.

    Features become virtual datasets over the pieces. Each piece's checksums
    are verified in the same single read that computes the joined file's
    checksums; a bad piece is quarantined and the join fails, so a retry
    recomputes it. Labels come from ``label_of`` (row id → label); ``skipped``
    lists the pieces' undecodable items, then ``left_out`` (items a scan left
    out). Use under the key's lock.
    """
    files = store.files
    partial = files.partial(key)
    if partial.exists():  # left by an older version's single-file run: keep it aside, never delete work
        quarantine(files, partial, "replaced", "this key is now joined from its pieces")
    header = {"key": key, "spec": canonical_json(spec), "classes": canonical_json(classes),
              "versions": canonical_json(versions), "batch_size": batch_size, "pieces": len(pieces), **(attrs or {})}
    read = _read_pieces(pieces, key)
    if read.bad:  # set the bad pieces aside so a rerun recomputes them; nothing was written
        for path in sorted(set(read.bad)):
            quarantine(files.pieces(), Path(path), "corrupt", "checksum mismatch found while joining")
        raise CorruptFeatureFile(
            f"piece(s) {', '.join(sorted(set(read.bad)))} of {short(key)} failed their checksums and were quarantined; "
            "rerun to recompute them"
        )
    _write_joined(partial, files.folder, read, label_of, header, list(left_out))
    fsync(partial)
    os.replace(partial, files.complete(key))
    fsync(files.folder)
    mark_used(files, key)
    return files.complete(key)


@dataclass
class _Pieces:
    """What one pass over the pieces found: per layer its sources and the joined checksum, the rows' ids, the
    pieces' skipped items, and the pieces that failed their checksums."""

    layers: dict[str, tuple[int, np.dtype]] = field(default_factory=dict)  # layer -> (width, dtype)
    sources: dict[str, list[tuple[Path, int]]] = field(default_factory=dict)  # layer -> [(piece, rows)]
    joint: dict[str, Any] = field(default_factory=dict)  # layer -> sha256 over every piece's bytes in order
    rows: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


def _read_pieces(paths: list[Path], key: str) -> _Pieces:
    """One read of every piece, one open file at a time (a split may have thousands): verifies each piece's
    checksums and feeds the joined file's."""
    out = _Pieces()
    for path in paths:
        try:
            with open_h5(path, "r") as fh:
                check_invariants(fh, FeatureFiles.key_of(path))
                stored = json_attr(fh.attrs, "checksums", {})
                rows = list(fh["paths"].asstr()[()])
                if not out.layers:
                    out.layers = {name: (ds.shape[1], ds.dtype) for name, ds in sorted(fh["features"].items())}
                    out.sources = {name: [] for name in out.layers}
                    out.joint = {name: hashlib.sha256() for name in out.layers}
                ok = stored.get("paths") == values_checksum(rows)
                for name in out.layers:
                    ds, own = fh["features"][name], hashlib.sha256()
                    for start in range(0, ds.shape[0], 65536):
                        block = bytes_view(ds[start : start + 65536])
                        own.update(block)
                        out.joint[name].update(block)
                    ok &= stored.get(f"features/{name}") == "sha256:" + own.hexdigest()
                    out.sources[name].append((path, ds.shape[0]))
                out.rows += rows
                out.skipped += json_attr(fh.attrs, "skipped", [])
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            raise CorruptFeatureFile(f"piece {path} of {short(key)} cannot be joined: {exc}") from exc
        if not ok:
            out.bad.append(str(path))
    return out


def _write_joined(partial: Path, folder: Path, read: _Pieces, label_of: Mapping[str, int],
                  header: dict[str, Any], left_out: list[dict[str, str]]) -> None:
    """The joined file at ``partial``, complete: virtual layers over the pieces, labels from ``label_of``."""
    labels = np.fromiter((label_of[p] for p in read.rows), dtype=np.int64, count=len(read.rows))
    checksums = {}
    with open_h5(partial, "w") as out:
        group = out.create_group("features")
        for name, (dim, dtype) in read.layers.items():
            total = sum(n for _, n in read.sources[name])
            if not total:
                group.create_dataset(name, shape=(0, dim), dtype=dtype)
            else:
                layout, offset = h5py.VirtualLayout(shape=(total, dim), dtype=dtype), 0
                for path, n in read.sources[name]:
                    if n:
                        layout[offset : offset + n] = h5py.VirtualSource(
                            os.path.relpath(path, folder), f"features/{name}", shape=(n, dim), dtype=dtype)
                    offset += n
                group.create_virtual_dataset(name, layout)
            checksums[f"features/{name}"] = "sha256:" + read.joint[name].hexdigest()
        out.create_dataset("labels", data=labels)
        out.create_dataset("paths", data=np.asarray(read.rows, dtype=object), dtype=STRING)
        checksums.update(labels=values_checksum(labels), paths=values_checksum(read.rows))
        out.attrs.update(
            rows_done=len(read.rows), skipped=canonical_json(read.skipped + left_out),
            checksums=canonical_json(checksums), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **header,
        )
        out.flush()
        out.attrs["complete"] = True
