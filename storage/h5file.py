"""The HDF5 feature file format: opening, checksums, invariants, quarantine.

Layout of ``<key>.h5`` (readable with plain h5py):

    /features/<layer>  (N, D) float16|float32, chunked (~1 MiB), no compression
    /labels            (N,) int64
    /paths             (N,) utf-8 strings, relative to the dataset root
    attrs: key, spec, classes, rows_done, complete, checksums, created_at,
           versions, skipped, batch_size

``complete`` is set last, after the checksums; readers only ever trust files
that carry it and pass :func:`check_invariants`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from storage.keys import FEATURE_FORMAT_VERSION, canonical_json
from storage.records import set_aside
from storage.layout import FeatureFiles

log = logging.getLogger("transferpipe.storage")

CHUNK_BYTES = 1 << 20
SPACE_MARGIN = 1 << 20  # for HDF5 metadata growth
STRING = h5py.string_dtype("utf-8")


class FeatureStoreError(RuntimeError):
    """A feature file could not be written or read."""


class CorruptFeatureFile(FeatureStoreError):
    """A file failed its invariants or checksums; it is never served."""


class LayerNotStored(ValueError):
    """A sound file asked for a layer it does not hold."""


def open_h5(path: str | Path, mode: str, **kwargs: Any) -> h5py.File:
    """Open with HDF5's own file locking off.

    Writers are serialised by the per-key lock and complete files never change,
    so HDF5's flock adds nothing; and a forked DataLoader worker inherits it,
    which made later opens of a completed file fail with EAGAIN.
    """
    return h5py.File(path, mode, locking=False, **kwargs)


_TRANSIENT = {errno.EAGAIN, errno.EACCES, errno.EBUSY, errno.EINTR, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def transient(exc: BaseException) -> bool:
    """An error about opening the file now (permissions, limits, locks), not a fault in its bytes."""
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT



def json_attr(attrs: h5py.AttributeManager, name: str, default: Any) -> Any:
    raw = attrs.get(name)
    return default if raw is None else json.loads(raw)


def chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def dataset_checksum(ds: h5py.Dataset, block_rows: int = 65536) -> str:
    """sha256 of a dataset's values: raw little-endian bytes, or canonical JSON for strings."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return values_checksum(list(ds.asstr()[()]))
    digest = hashlib.sha256()
    for start in range(0, ds.shape[0], block_rows):
        digest.update(bytes_view(ds[start : start + block_rows]))
    return "sha256:" + digest.hexdigest()



def bytes_view(values: np.ndarray) -> memoryview:
    """The array's bytes without copying them (hashlib reads any buffer)."""
    return memoryview(np.ascontiguousarray(values)).cast("B")


def values_checksum(values: np.ndarray | list[str]) -> str:
    """The same digest as :func:`dataset_checksum`, of values already in memory."""
    if isinstance(values, list):
        data = canonical_json(values).encode("utf-8")
    else:
        data = bytes_view(values)
    return "sha256:" + hashlib.sha256(data).hexdigest()



def file_checksums(fh: h5py.File) -> dict[str, str]:
    names = [f"features/{layer}" for layer in sorted(fh["features"])] + ["labels", "paths"]
    return {name: dataset_checksum(fh[name]) for name in names}


def check_invariants(fh: h5py.File, key: str | None = None) -> None:
    """Cheap checks done on every open of a complete file; raises CorruptFeatureFile."""
    name = fh.filename
    attrs = fh.attrs
    if not attrs.get("complete", False):
        raise CorruptFeatureFile(f"{name}: not marked complete")
    spec = json_attr(attrs, "spec", {})
    version = spec.get("format_version")
    if version != FEATURE_FORMAT_VERSION:
        raise CorruptFeatureFile(f"{name}: format version {version!r}, this transferpipe reads {FEATURE_FORMAT_VERSION}")
    if key is not None and attrs.get("key") != key:
        raise CorruptFeatureFile(f"{name}: holds key {attrs.get('key')!r}, expected {key!r}")
    rows = int(attrs["rows_done"])
    shapes = {f"features/{layer}": fh["features"][layer].shape for layer in fh["features"]}
    shapes.update(labels=fh["labels"].shape, paths=fh["paths"].shape)
    bad = {n: s for n, s in shapes.items() if s[0] != rows}
    if bad or set(spec.get("layers", [])) != set(fh["features"]):
        raise CorruptFeatureFile(f"{name}: rows_done={rows} but shapes are {shapes}")
    if "checksums" not in attrs:
        raise CorruptFeatureFile(f"{name}: no checksums")
    folder = Path(name).parent
    for layer in fh["features"]:
        ds = fh["features"][layer]
        if ds.is_virtual:  # a missing piece would read as fill values, silently
            missing = sorted({vs.file_name for vs in ds.virtual_sources()
                              if vs.file_name != "." and not (folder / vs.file_name).exists()})
            if missing:
                raise CorruptFeatureFile(f"{name}: piece file(s) {', '.join(missing)} of features/{layer} are missing")


def quarantine(files: FeatureFiles, path: Path, reason: str, why: str) -> Path:
    """Set a bad file aside in ``files``' quarantine folder (never delete it) and say so."""
    return set_aside(path, files.quarantine(), why, tag=reason)


def mark_used(files: FeatureFiles, key: str) -> None:
    """Touch ``<key>.used``: ``cache gc --unused-days`` reads it (a complete file is never touched).
    A read-only cache is read all the same."""
    try:
        files.used_marker(key).touch()
    except OSError:
        pass


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
