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

import contextlib
import hashlib
import os
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


def _virtual_layer(group: h5py.Group, layer: str, sources: list, root: Path, bad: list[str]) -> str:
    """``group[layer]`` as a virtual dataset over ``(piece path, dataset, stored checksum)`` in order.

    One read of every piece both verifies it (a mismatch appends its path to
    ``bad``) and feeds the joined dataset's checksum, which is returned.
    """
    first = sources[0][1]
    dim, dtype = first.shape[1], first.dtype
    total = sum(ds.shape[0] for _, ds, _ in sources)
    if not total:
        group.create_dataset(layer, shape=(0, dim), dtype=dtype)
        return values_checksum(np.empty((0, dim), dtype=dtype))
    layout = h5py.VirtualLayout(shape=(total, dim), dtype=dtype)
    joint, offset = hashlib.sha256(), 0
    for path, ds, stored in sources:
        n, own = ds.shape[0], hashlib.sha256()
        for start in range(0, n, 65536):
            block = bytes_view(ds[start : start + 65536])
            own.update(block)
            joint.update(block)
        if stored != "sha256:" + own.hexdigest():
            bad.append(str(path))
        if n:
            layout[offset : offset + n] = h5py.VirtualSource(
                os.path.relpath(path, root), ds.name, shape=(n, dim), dtype=dtype)
        offset += n
    group.create_virtual_dataset(layer, layout)
    return "sha256:" + joint.hexdigest()


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
    with contextlib.ExitStack() as stack:
        opened = [_open_piece(stack, path, key) for path in pieces]
        bad = _write_joined(partial, files.folder, pieces, opened, label_of, header, list(left_out))
    if bad:  # the partial holds only metadata: drop it; set the bad pieces aside so a rerun recomputes them
        partial.unlink()
        for path in sorted(set(bad)):
            quarantine(files.pieces(), Path(path), "corrupt", "checksum mismatch found while joining")
        raise CorruptFeatureFile(
            f"piece(s) {', '.join(sorted(set(bad)))} of {short(key)} failed their checksums and were quarantined; "
            "rerun to recompute them"
        )
    fsync(partial)
    os.replace(partial, files.complete(key))
    fsync(files.folder)
    mark_used(files, key)
    return files.complete(key)


def _open_piece(stack: contextlib.ExitStack, path: Path, key: str) -> h5py.File:
    try:
        fh = stack.enter_context(open_h5(path, "r"))
        check_invariants(fh, FeatureFiles.key_of(path))
    except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
        raise CorruptFeatureFile(f"piece {path} of {short(key)} cannot be joined: {exc}") from exc
    return fh


def _write_joined(partial: Path, folder: Path, paths: list[Path], pieces: list[h5py.File],
                  label_of: Mapping[str, int], header: dict[str, Any], left_out: list[dict[str, str]]) -> list[str]:
    """The joined file at ``partial`` (complete unless a piece is bad); returns the bad pieces' paths."""
    stored = [json_attr(fh.attrs, "checksums", {}) for fh in pieces]
    piece_rows = [list(fh["paths"].asstr()[()]) for fh in pieces]
    bad = [str(path) for path, sums, rows in zip(paths, stored, piece_rows) if sums.get("paths") != values_checksum(rows)]
    row_paths = [p for rows in piece_rows for p in rows]
    labels = np.fromiter((label_of[p] for p in row_paths), dtype=np.int64, count=len(row_paths))
    checksums = {}
    with open_h5(partial, "w") as out:
        group = out.create_group("features")
        layers = sorted(pieces[0]["features"]) if pieces else []
        for layer in layers:
            sources = [(path, fh["features"][layer], sums.get(f"features/{layer}"))
                       for path, fh, sums in zip(paths, pieces, stored)]
            checksums[f"features/{layer}"] = _virtual_layer(group, layer, sources, folder, bad)
        if bad:
            return bad
        out.create_dataset("labels", data=labels)
        out.create_dataset("paths", data=np.asarray(row_paths, dtype=object), dtype=STRING)
        checksums.update(labels=values_checksum(labels), paths=values_checksum(row_paths))
        skipped = [s for fh in pieces for s in json_attr(fh.attrs, "skipped", [])] + left_out
        out.attrs.update(
            rows_done=len(row_paths), skipped=canonical_json(skipped),
            checksums=canonical_json(checksums), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **header,
        )
        out.flush()
        out.attrs["complete"] = True
    return bad
