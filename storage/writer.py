"""Writing one feature file: append batches to ``<key>.h5.partial``, resume it, complete it atomically.

Features are preallocated and filled batch by batch, each batch flushed and
followed by ``rows_done``/``skipped``. Chunks are uncompressed so rewriting a
chunk never moves it, which keeps rows below ``rows_done`` intact when a writer
is killed. ``labels`` and ``paths`` follow from the manifest and are written
once, at completion; then checksums, then ``complete`` (last), then an atomic
rename to ``<key>.h5``. A complete file is never modified again.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.atomic import room_problem
from storage.faults import fault_point
from storage.h5file import (
    CHUNK_BYTES, SPACE_MARGIN, STRING, FeatureStoreError, chunk_rows, file_checksums, fsync, json_attr, mark_used,
    open_h5, quarantine,
)
from storage.keys import canonical_json
from storage.layout import FeatureFiles

log = logging.getLogger("transferpipe.storage")


class FeatureWriter:
    """Appends batches to ``<key>.h5.partial`` and completes it atomically.

    Resumes an existing partial file when its key and layer shapes match;
    a partial that cannot be opened is set aside (renamed, never deleted).
    Use under the key's lock (:meth:`storage.features.FeatureStore.lock`).
    """

    def __init__(
        self,
        files: FeatureFiles,
        key: str,
        *,
        spec: dict[str, Any],
        classes: list[str],
        dims: dict[str, int],
        total: int,
        batch_size: int,
        versions: dict[str, str],
        attrs: dict[str, str] | None = None,
    ) -> None:
        self.files, self.key, self.total = files, key, total
        self.partial = files.partial(key)
        self.final = files.complete(key)
        self.fh = self._open_existing(spec, dims) if self.partial.exists() else None
        if self.fh is None:
            header = {"key": key, "spec": canonical_json(spec), "classes": canonical_json(classes),
                      "versions": canonical_json(versions), "batch_size": batch_size, **(attrs or {})}
            self.fh = self._create(np.dtype(spec["dtype"]), dims, header)
        self.rows_done = int(self.fh.attrs["rows_done"])
        self.skipped = self.read_skipped(self.fh)
        self.batch_size = int(self.fh.attrs["batch_size"])
        self.dims = {layer: int(ds.shape[1]) for layer, ds in self.fh["features"].items()}

    def _create(self, dtype: np.dtype, dims: dict[str, int], header: dict[str, Any]) -> h5py.File:
        """A new partial file: every layer preallocated (total rows, ~1 MiB chunks), nothing written yet."""
        total = self.total
        self._check_space(total * sum(dims.values()) * dtype.itemsize, "the whole file", "nothing was written")
        try:
            fh = open_h5(self.partial, "w", rdcc_nbytes=4 * CHUNK_BYTES)
        except OSError as exc:
            raise FeatureStoreError(f"cannot create {self.partial}: {exc}") from exc
        group = fh.create_group("features")
        for layer, dim in dims.items():
            rows = chunk_rows(dim, dtype.itemsize)
            group.create_dataset(layer, shape=(total, dim), maxshape=(None, dim), dtype=dtype,
                                 chunks=(min(rows, max(total, 1)), dim))
        fh.attrs.update(rows_done=0, skipped="[]", complete=False, **header)
        fh.flush()
        return fh

    @staticmethod
    def read_skipped(fh: h5py.File) -> list[dict[str, str]]:
        """Items left out (undecodable images), as ``[{path, error}]``."""
        return json_attr(fh.attrs, "skipped", [])

    def _open_existing(self, spec: dict[str, Any], dims: dict[str, int]) -> h5py.File | None:
        try:
            fh = open_h5(self.partial, "a", rdcc_nbytes=4 * CHUNK_BYTES)
        except OSError as exc:
            quarantine(self.files, self.partial, "torn", f"cannot be opened ({exc})")
            return None
        try:
            found = {layer: fh["features"][layer].shape[1] for layer in fh["features"]}
            rows_done = int(fh.attrs["rows_done"])
            json.loads(fh.attrs["skipped"])
            same = fh.attrs.get("key") == self.key and json.loads(fh.attrs["spec"]) == spec and found == dims
            why = f"its key, spec or widths {found} do not match this run's {dims}"
        except (KeyError, ValueError, OSError) as exc:
            same, why = False, f"unreadable attributes ({exc})"
        if not same:
            fh.close()
            quarantine(self.files, self.partial, "mismatch", why)
            return None
        for ds in fh["features"].values():  # a run killed inside complete() had shrunk them
            if ds.shape[0] != self.total:
                ds.resize(self.total, axis=0)
        log.info("resuming %s at row %d", self.partial.name, rows_done)
        return fh

    @property
    def position(self) -> int:
        """How many manifest items are done: written rows plus skipped items."""
        return self.rows_done + len(self.skipped)

    def copy(self, features: dict[str, np.ndarray], skipped: list[dict[str, str]]) -> None:
        """:meth:`append` of rows another file already holds (a grown piece's old rows), counted in the file's
        ``rows_copied`` attribute: what went through the backbone is its rows less those."""
        self.append(features, skipped)
        self.fh.attrs["rows_copied"] = int(self.fh.attrs.get("rows_copied", 0)) + len(next(iter(features.values())))
        self.fh.flush()

    def append(self, features: dict[str, np.ndarray], skipped: list[dict[str, str]] = ()) -> None:
        """Write one batch of rows (and the items skipped in it), then flush."""
        n = len(next(iter(features.values()))) if features else 0
        start = self.rows_done
        self._check_space(
            sum(block.nbytes for block in features.values()) + len(features) * CHUNK_BYTES,
            "the next batch", f"{self.partial.name} is kept at row {start} and resumes from there",
        )
        try:
            for layer, block in features.items():
                self.fh["features"][layer][start : start + n] = block
            self.fh.flush()
            fault_point("store.append")
            self.rows_done += n
            self.skipped.extend(skipped)
            self.fh.attrs["rows_done"] = self.rows_done
            self.fh.attrs["skipped"] = canonical_json(self.skipped)
            self.fh.flush()
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for failed flushes
            raise FeatureStoreError(
                f"writing {self.partial} failed ({exc}); the partial file is kept and the next run resumes "
                f"from its last flushed batch (row {start} or earlier)"
            ) from exc

    def complete(self, labels: np.ndarray, paths: list[str]) -> Path:
        """Write labels and paths, checksums, ``complete``; rename into place."""
        if len(labels) != self.rows_done or len(paths) != self.rows_done:
            raise FeatureStoreError(
                f"{self.partial}: {self.rows_done} rows written but {len(labels)} labels / {len(paths)} paths given"
            )
        fh = self.fh
        try:
            for layer in fh["features"]:
                fh["features"][layer].resize(self.rows_done, axis=0)
            for name in ("labels", "paths"):
                if name in fh:
                    del fh[name]
            fh.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            fh.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=STRING)
            fh.attrs["checksums"] = canonical_json(file_checksums(fh))
            fh.attrs["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            fh.flush()
            fault_point("store.complete")
            fh.attrs["complete"] = True
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise FeatureStoreError(f"completing {self.partial} failed ({exc}); the partial file is kept") from exc
        self.close()
        fsync(self.partial)
        os.replace(self.partial, self.final)
        fsync(self.final.parent)
        mark_used(self.files, self.key)
        return self.final

    def _check_space(self, needed: int, what: str, then: str) -> None:
        """Fail before HDF5 writes on a full disk: a failed HDF5 flush cannot be recovered in-process.

        Checked before the file is created and before every batch, so the
        partial file always stays at its last complete flush and resumes.
        """
        problem = room_problem(self.partial, needed + SPACE_MARGIN,
                               self.partial.stat().st_size if self.fh is not None else 0)
        if problem is not None:
            raise FeatureStoreError(f"{problem} for {what}; {then}. Free some space (transferpipe cache gc) or "
                                    "raise the limit, and rerun")

    def close(self) -> None:
        if self.fh is not None and self.fh.id.valid:
            self.fh.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            self.close()
        except (OSError, RuntimeError):
            if exc_type is None:
                raise  # otherwise keep the error that got us here (say, an I/O error)
