"""Joining a split extracted in shards (scale-out workers) into one feature file, without copying.

Each shard is a complete file under ``shards/<key>/``; the joined ``<key>.h5``
holds ``features/<layer>`` as HDF5 virtual datasets over them (source paths
relative to the features folder, so the cache can move), with the checksums a
single-process file would have. Readers see no difference.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from storage.h5file import (
    STRING, CorruptFeatureFile, bytes_view, check_invariants, fsync, json_attr, mark_used, open_h5, quarantine,
    values_checksum,
)
from storage.keys import canonical_json, short

if TYPE_CHECKING:
    from storage.features import FeatureStore


def _virtual_layer(group: h5py.Group, layer: str, sources: list, root: Path, bad: list[str]) -> str:
    """``group[layer]`` as a virtual dataset over ``(shard path, dataset, stored checksum)`` in order.

    One read of every shard both verifies it (a mismatch appends its path to
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


def join_shards(
    store: FeatureStore, key: str, parts: list[str], *, spec: dict[str, Any], classes: list[str],
    versions: dict[str, str], batch_size: int, attrs: dict[str, str] | None = None,
) -> Path:
    """Join complete shard files (in order) into ``<key>.h5`` without copying features.

    Features become virtual datasets over the shards. Each shard's checksums
    are verified in the same single read that computes the joined file's
    checksums (equal to those of one file written in one process); a bad
    shard is quarantined and the join fails, so a retry recomputes it.
    Use under the key's lock.
    """
    files, shard_files = store.files, store.files.shards(key)
    paths = [shard_files.complete(part) for part in parts]
    partial = files.partial(key)
    if partial.exists():  # left by a single-process run: keep it aside, never delete work
        quarantine(files, partial, "replaced", "a sharded extraction is joining this key")
    header = {"key": key, "spec": canonical_json(spec), "classes": canonical_json(classes),
              "versions": canonical_json(versions), "batch_size": batch_size, "shards": canonical_json(parts),
              **(attrs or {})}
    with contextlib.ExitStack() as stack:
        shards = [_open_shard(stack, path, part, key) for part, path in zip(parts, paths)]
        bad = _write_joined(partial, files.folder, paths, shards, header)
    if bad:  # the partial holds only metadata: drop it; set the bad shards aside so a rerun recomputes them
        partial.unlink()
        for path in sorted(set(bad)):
            quarantine(shard_files, Path(path), "corrupt", "checksum mismatch found while joining")
        raise CorruptFeatureFile(
            f"shard(s) {', '.join(sorted(set(bad)))} of {short(key)} failed their checksums and were quarantined; "
            "rerun to recompute them"
        )
    fsync(partial)
    os.replace(partial, files.complete(key))
    fsync(files.folder)
    mark_used(files, key)
    return files.complete(key)


def _open_shard(stack: contextlib.ExitStack, path: Path, part: str, key: str) -> h5py.File:
    try:
        fh = stack.enter_context(open_h5(path, "r"))
        check_invariants(fh, part)
    except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
        raise CorruptFeatureFile(f"shard {path} of {short(key)} cannot be joined: {exc}") from exc
    return fh


def _write_joined(partial: Path, folder: Path, paths: list[Path], shards: list[h5py.File],
                  header: dict[str, Any]) -> list[str]:
    """The joined file at ``partial`` (complete unless a shard is bad); returns the bad shards' paths."""
    stored = [json_attr(fh.attrs, "checksums", {}) for fh in shards]
    shard_labels = [fh["labels"][()] for fh in shards]
    shard_paths = [list(fh["paths"].asstr()[()]) for fh in shards]
    bad = [str(path) for path, sums, y, p in zip(paths, stored, shard_labels, shard_paths)
           if sums.get("labels") != values_checksum(y) or sums.get("paths") != values_checksum(p)]
    labels = np.concatenate(shard_labels).astype(np.int64)
    row_paths = [p for rows in shard_paths for p in rows]
    checksums = {}
    with open_h5(partial, "w") as out:
        group = out.create_group("features")
        for layer in sorted(shards[0]["features"]):
            sources = [(path, fh["features"][layer], sums.get(f"features/{layer}"))
                       for path, fh, sums in zip(paths, shards, stored)]
            checksums[f"features/{layer}"] = _virtual_layer(group, layer, sources, folder, bad)
        if bad:
            return bad
        out.create_dataset("labels", data=labels)
        out.create_dataset("paths", data=np.asarray(row_paths, dtype=object), dtype=STRING)
        checksums.update(labels=values_checksum(labels), paths=values_checksum(row_paths))
        skipped = [s for fh in shards for s in json_attr(fh.attrs, "skipped", [])]
        out.attrs.update(
            rows_done=sum(int(fh.attrs["rows_done"]) for fh in shards), skipped=canonical_json(skipped),
            checksums=canonical_json(checksums), created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **header,
        )
        out.flush()
        out.attrs["complete"] = True
    return bad
