"""HDF5 feature files: create, append, resume, complete, verify, read, lock.

Layout of ``<key>.h5`` (readable with plain h5py):

    /features/<layer>  (N, D) float16|float32, chunked (~1 MiB), no compression
    /labels            (N,) int64
    /paths             (N,) utf-8 strings, relative to the dataset root
    attrs: key, spec, classes, rows_done, complete, checksums, created_at,
           versions, skipped, batch_size

A file is written as ``<key>.h5.partial``: features are preallocated and filled
batch by batch, each batch flushed and followed by ``rows_done``/``skipped``.
Chunks are uncompressed so rewriting a chunk never moves it, which keeps rows
below ``rows_done`` intact when a writer is killed. ``labels`` and ``paths``
follow from the manifest and are written once, at completion; then checksums,
then ``complete`` (last), then an atomic rename to ``<key>.h5``. A complete file
is never modified again; readers only ever open complete files.

A split extracted in shards (scale-out workers) has one complete file per shard
under ``shards/<key>/``; :meth:`FeatureStore.join` then writes ``<key>.h5`` whose
``features/<layer>`` are HDF5 virtual datasets over the shards (no copy; source
paths relative to this folder, so the cache can move), with the same checksums
a single-process file would have. Readers see no difference.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from filelock import FileLock, Timeout

from storage.faults import fault_point
from storage.keys import FEATURE_FORMAT_VERSION, canonical_json, short

log = logging.getLogger("transferpipe.storage")

CHUNK_BYTES = 1 << 20
SPACE_MARGIN = 1 << 20  # for HDF5 metadata growth
DTYPES = ("float16", "float32")
_STR = h5py.string_dtype("utf-8")


class FeatureStoreError(RuntimeError):
    """A feature file could not be written or read."""


class CorruptFeatureFile(FeatureStoreError):
    """A file failed its invariants or checksums; it is never served."""


class LayerNotStored(ValueError):
    """A sound file asked for a layer it does not hold."""


@dataclass(frozen=True)
class FeatureSet:
    """A complete feature file loaded into memory."""

    key: str
    path: Path
    features: dict[str, np.ndarray]
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    spec: dict[str, Any]
    skipped: list[dict[str, str]]


@dataclass(frozen=True)
class FeatureInfo:
    """One row of ``transferpipe cache ls``."""

    key: str
    path: Path
    complete: bool
    spec: dict[str, Any]
    rows: int
    dims: dict[str, int]
    size_bytes: int
    created_at: str
    error: str = ""
    dataset_root: str = ""
    last_used: float | None = None
    skipped: tuple[dict[str, str], ...] = ()


def _h5(path: str | Path, mode: str, **kwargs: Any) -> h5py.File:
    """Open with HDF5's own file locking off.

    Writers are serialised by the per-key lock and complete files never change,
    so HDF5's flock adds nothing, and it breaks readers: a DataLoader worker
    forked while another thread had a partial file open inherits that flock and
    keeps it after the writer closes, so every later open of the completed file
    fails with EAGAIN ("unable to lock file") until the worker exits (seen in a
    sweep: a sound file was quarantined).
    """
    return h5py.File(path, mode, locking=False, **kwargs)


_TRANSIENT = {errno.EAGAIN, errno.EACCES, errno.EBUSY, errno.EINTR, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def _transient(exc: BaseException) -> bool:
    """An error about opening the file now (permissions, limits, locks), not a fault in its bytes."""
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT


def _json_attr(attrs: h5py.AttributeManager, name: str, default: Any) -> Any:
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
        digest.update(_bytes_view(ds[start : start + block_rows]))
    return "sha256:" + digest.hexdigest()


def _bytes_view(values: np.ndarray) -> memoryview:
    """The array's bytes without copying them (hashlib reads any buffer)."""
    return memoryview(np.ascontiguousarray(values)).cast("B")


def values_checksum(values: np.ndarray | list[str]) -> str:
    """The same digest as :func:`dataset_checksum`, of values already in memory."""
    if isinstance(values, list):
        data = canonical_json(values).encode("utf-8")
    else:
        data = _bytes_view(values)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _file_checksums(fh: h5py.File) -> dict[str, str]:
    names = [f"features/{layer}" for layer in sorted(fh["features"])] + ["labels", "paths"]
    return {name: dataset_checksum(fh[name]) for name in names}


def check_invariants(fh: h5py.File, key: str | None = None) -> None:
    """Cheap checks done on every open of a complete file; raises CorruptFeatureFile."""
    name = fh.filename
    attrs = fh.attrs
    if not attrs.get("complete", False):
        raise CorruptFeatureFile(f"{name}: not marked complete")
    spec = _json_attr(attrs, "spec", {})
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
        if ds.is_virtual:  # a missing shard would read as fill values, silently
            missing = sorted({vs.file_name for vs in ds.virtual_sources()
                              if vs.file_name != "." and not (folder / vs.file_name).exists()})
            if missing:
                raise CorruptFeatureFile(f"{name}: shard file(s) {', '.join(missing)} of features/{layer} are missing")


class FeatureWriter:
    """Appends batches to ``<key>.h5.partial`` and completes it atomically.

    Resumes an existing partial file when its key and layer shapes match;
    a partial that cannot be opened is set aside (renamed, never deleted).
    Use through :meth:`FeatureStore.writer`, under the key's lock.
    """

    def __init__(
        self,
        store: FeatureStore,
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
        self.store, self.key, self.total = store, key, total
        self.partial = store.partial_path(key)
        self.final = store.path(key)
        dtype = np.dtype(spec["dtype"])
        self.fh = self._open_existing(spec, dims) if self.partial.exists() else None
        if self.fh is None:
            self._check_space(total * sum(dims.values()) * dtype.itemsize, "the whole file", "nothing was written")
            try:
                self.fh = _h5(self.partial, "w", rdcc_nbytes=4 * CHUNK_BYTES)
            except OSError as exc:
                raise FeatureStoreError(f"cannot create {self.partial}: {exc}") from exc
            group = self.fh.create_group("features")
            for layer, dim in dims.items():
                rows = chunk_rows(dim, dtype.itemsize)
                group.create_dataset(
                    layer, shape=(total, dim), maxshape=(None, dim), dtype=dtype,
                    chunks=(min(rows, max(total, 1)), dim),
                )
            self.fh.attrs.update(
                key=key, spec=canonical_json(spec), classes=canonical_json(classes),
                versions=canonical_json(versions), batch_size=batch_size,
                rows_done=0, skipped="[]", complete=False, **(attrs or {}),
            )
            self.fh.flush()
        self.rows_done = int(self.fh.attrs["rows_done"])
        self.skipped = self.read_skipped(self.fh)
        self.batch_size = int(self.fh.attrs["batch_size"])
        self.dims = {layer: int(ds.shape[1]) for layer, ds in self.fh["features"].items()}

    @staticmethod
    def read_skipped(fh: h5py.File) -> list[dict[str, str]]:
        """Items left out (undecodable images), as ``[{path, error}]``."""
        return _json_attr(fh.attrs, "skipped", [])

    def _open_existing(self, spec: dict[str, Any], dims: dict[str, int]) -> h5py.File | None:
        try:
            fh = _h5(self.partial, "a", rdcc_nbytes=4 * CHUNK_BYTES)
        except OSError as exc:
            self.store.quarantine(self.partial, "torn", f"cannot be opened ({exc})")
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
            self.store.quarantine(self.partial, "mismatch", why)
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
            fh.create_dataset("paths", data=np.asarray(paths, dtype=object), dtype=_STR)
            fh.attrs["checksums"] = canonical_json(_file_checksums(fh))
            fh.attrs["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            fh.flush()
            fault_point("store.complete")
            fh.attrs["complete"] = True
            fh.flush()
        except (OSError, RuntimeError) as exc:
            raise FeatureStoreError(f"completing {self.partial} failed ({exc}); the partial file is kept") from exc
        self.close()
        _fsync(self.partial)
        os.replace(self.partial, self.final)
        _fsync(self.final.parent)
        self.store.mark_used(self.key)
        return self.final

    def _check_space(self, needed: int, what: str, then: str) -> None:
        """Fail before HDF5 writes on a full disk: a failed HDF5 flush cannot be recovered in-process.

        Checked before the file is created and before every batch, so the
        partial file always stays at its last complete flush and resumes.
        """
        needed += SPACE_MARGIN
        free = shutil.disk_usage(self.partial.parent).free
        if free < needed:
            raise FeatureStoreError(
                f"not enough disk space in {self.partial.parent} for {what}: {free / 2**20:.1f} MiB free, "
                f"{needed / 2**20:.1f} MiB needed; {then}. Free some space (transferpipe cache gc) and rerun"
            )

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            block = _bytes_view(ds[start : start + 65536])
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


class FeatureStore:
    """The feature files under ``<cache_dir>/features``; the source of truth for extraction."""

    def __init__(self, cache_dir: str | Path | None, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else Path(cache_dir).expanduser() / "features"
        if root is None:
            self.root.mkdir(parents=True, exist_ok=True)

    def shards(self, key: str) -> FeatureStore:
        """The store of ``key``'s shard files, ``shards/<key>/`` (made by the first writer's lock)."""
        return FeatureStore(None, root=self.root / "shards" / key)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.h5"

    def partial_path(self, key: str) -> Path:
        return self.root / f"{key}.h5.partial"

    def lock(self, key: str, timeout: float = -1) -> FileLock:
        """One writer per key: an OS lock (flock) that dies with its holder."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{key}.h5.lock"), timeout=timeout)

    def writer(self, key: str, **kwargs: Any) -> FeatureWriter:
        return FeatureWriter(self, key, **kwargs)

    def quarantine(self, path: Path, reason: str, why: str) -> Path:
        """Set a bad file aside (never delete it) and say so."""
        target_dir = self.root / "quarantine"
        target_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = target_dir / f"{path.name}.{reason}-{stamp}"
        os.replace(path, target)
        log.warning("%s: %s; moved to %s", path, why, target)
        return target

    def lookup(self, key: str) -> Path | None:
        """The complete file for ``key`` if it exists and passes its cheap invariants.

        A file that fails them is quarantined and ``None`` is returned, so the
        caller recomputes: a cache hit never points at a bad file.
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with _h5(path, "r") as fh:
                check_invariants(fh, key)
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            if _transient(exc):
                raise FeatureStoreError(f"cannot open {path} now ({exc}); the file is kept, retry") from exc
            self.quarantine(path, "corrupt", str(exc))
            return None
        self.mark_used(key)
        return path

    def read(self, key: str, layers: list[str] | None = None) -> FeatureSet:
        """Load a complete file, checking every checksum of what is read (a bad file is quarantined)."""
        path = self.path(key)
        try:
            with _h5(path, "r") as fh:
                check_invariants(fh, key)
                wanted = layers or sorted(fh["features"])
                missing = sorted(set(wanted) - set(fh["features"]))
                if missing:
                    raise LayerNotStored(
                        f"feature file {short(key)} has no layer(s) {missing}, only {sorted(fh['features'])}; "
                        "add them to backbone.layers to extract them"
                    )
                values: dict[str, Any] = {f"features/{layer}": fh["features"][layer][()] for layer in wanted}
                values["labels"] = fh["labels"][()]
                values["paths"] = list(fh["paths"].asstr()[()])
                stored = _json_attr(fh.attrs, "checksums", {})
                attrs = {name: _json_attr(fh.attrs, name, []) for name in ("classes", "spec", "skipped")}
            bad = [name for name, v in values.items() if stored.get(name) != values_checksum(v)]
            if bad:
                raise CorruptFeatureFile(f"{path}: checksum mismatch in {', '.join(bad)}")
        except FileNotFoundError:
            raise FeatureStoreError(f"no feature file for key {short(key)} at {path}") from None
        except LayerNotStored:
            raise  # a question about the file, not a fault in it
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            if _transient(exc):
                raise FeatureStoreError(f"cannot read {path} now ({exc}); the file is kept, retry") from exc
            if path.exists():
                self.quarantine(path, "corrupt", str(exc))
            raise CorruptFeatureFile(f"{exc}; it was quarantined and the next extraction recomputes it") from exc
        self.mark_used(key)
        return FeatureSet(
            key=key, path=path, labels=values.pop("labels"), paths=values.pop("paths"),
            features={name.removeprefix("features/"): v for name, v in values.items()},
            classes=attrs["classes"], spec=attrs["spec"], skipped=attrs["skipped"],
        )

    def paths(self, key: str) -> list[str]:
        """Only the row paths of a complete file (cheap checks; no feature is read)."""
        with _h5(self.path(key), "r") as fh:
            check_invariants(fh, key)
            return list(fh["paths"].asstr()[()])

    def verify(self, key: str) -> list[str]:
        """Recompute the checksums of a complete file; return the problems found."""
        path = self.path(key)
        try:
            with _h5(path, "r") as fh:
                check_invariants(fh, key)
                stored = _json_attr(fh.attrs, "checksums", {})
                actual = _file_checksums(fh)
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            return [f"{path}: {exc}"]
        return [f"{path}: {name} checksum mismatch" for name in sorted(actual) if stored.get(name) != actual[name]]

    def keys(self) -> Iterator[str]:
        for path in sorted(self.root.glob("*.h5")):
            yield path.name[: -len(".h5")]

    def all_keys(self) -> list[str]:
        """Keys with a complete or a partial file."""
        names = {p.name.split(".")[0] for p in self.root.glob("*.h5")} | {
            p.name.split(".")[0] for p in self.root.glob("*.h5.partial")
        }
        return sorted(names)

    def resolve_keys(self, prefixes: list[str]) -> list[str]:
        """Full keys from (short) prefixes; unknown or ambiguous prefixes are an error naming them."""
        known = self.all_keys()
        out, problems = [], []
        for prefix in prefixes:
            matches = [k for k in known if k.startswith(prefix.lower())]
            if len(matches) == 1:
                out.append(matches[0])
            else:
                problems.append(f"{prefix!r} matches {'no' if not matches else len(matches)} cached keys")
        if problems:
            raise KeyError(f"in {self.root}: " + "; ".join(problems))
        return out

    def join(
        self, key: str, parts: list[str], *, spec: dict[str, Any], classes: list[str], versions: dict[str, str],
        batch_size: int, attrs: dict[str, str] | None = None,
    ) -> Path:
        """Join complete shard files (in order) into ``<key>.h5`` without copying features.

        Features become virtual datasets over the shards. Each shard's checksums
        are verified in the same single read that computes the joined file's
        checksums (equal to those of one file written in one process); a bad
        shard is quarantined and the join fails, so a retry recomputes it.
        Use under the key's lock.
        """
        shard_store = self.shards(key)
        paths = [shard_store.path(part) for part in parts]
        partial = self.partial_path(key)
        if partial.exists():  # left by a single-process run: keep it aside, never delete work
            self.quarantine(partial, "replaced", "a sharded extraction is joining this key")
        with contextlib.ExitStack() as stack:
            shards = []
            for part, path in zip(parts, paths):
                try:
                    fh = stack.enter_context(_h5(path, "r"))
                    check_invariants(fh, part)
                except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
                    raise CorruptFeatureFile(f"shard {path} of {short(key)} cannot be joined: {exc}") from exc
                shards.append(fh)
            total = sum(int(fh.attrs["rows_done"]) for fh in shards)
            stored = [_json_attr(fh.attrs, "checksums", {}) for fh in shards]
            shard_labels = [fh["labels"][()] for fh in shards]
            shard_paths = [list(fh["paths"].asstr()[()]) for fh in shards]
            bad = [str(path) for path, sums, y, p in zip(paths, stored, shard_labels, shard_paths)
                   if sums.get("labels") != values_checksum(y) or sums.get("paths") != values_checksum(p)]
            labels = np.concatenate(shard_labels).astype(np.int64)
            row_paths = [p for rows in shard_paths for p in rows]
            skipped = [s for fh in shards for s in _json_attr(fh.attrs, "skipped", [])]
            checksums = {}
            with _h5(partial, "w") as out:
                group = out.create_group("features")
                for layer in sorted(shards[0]["features"]):
                    sources = [(path, fh["features"][layer], sums.get(f"features/{layer}"))
                               for path, fh, sums in zip(paths, shards, stored)]
                    checksums[f"features/{layer}"] = _virtual_layer(group, layer, sources, self.root, bad)
                if not bad:
                    out.create_dataset("labels", data=labels)
                    out.create_dataset("paths", data=np.asarray(row_paths, dtype=object), dtype=_STR)
                    checksums.update(labels=values_checksum(labels), paths=values_checksum(row_paths))
                    out.attrs.update(
                        key=key, spec=canonical_json(spec), classes=canonical_json(classes),
                        versions=canonical_json(versions), batch_size=batch_size, rows_done=total,
                        skipped=canonical_json(skipped), checksums=canonical_json(checksums), shards=canonical_json(parts),
                        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **(attrs or {}),
                    )
                    out.flush()
                    out.attrs["complete"] = True
        if bad:  # the partial holds only metadata: drop it; set the bad shards aside so a rerun recomputes them
            partial.unlink()
            for path in sorted(set(bad)):
                shard_store.quarantine(Path(path), "corrupt", "checksum mismatch found while joining")
            raise CorruptFeatureFile(
                f"shard(s) {', '.join(sorted(set(bad)))} of {short(key)} failed their checksums and were quarantined; "
                "rerun to recompute them"
            )
        _fsync(partial)
        os.replace(partial, self.path(key))
        _fsync(self.root)
        self.mark_used(key)
        return self.path(key)

    # ------------------------------------------------------------------ use and removal

    def _used_marker(self, key: str) -> Path:
        return self.root / f"{key}.used"

    def mark_used(self, key: str) -> None:
        """Touch ``<key>.used``: ``cache gc --unused-days`` reads it (a complete file is never touched)."""
        self._used_marker(key).touch()

    def last_used(self, key: str) -> float | None:
        marker = self._used_marker(key)
        return marker.stat().st_mtime if marker.exists() else None

    def remove(self, key: str, dry_run: bool = False) -> list[Path]:
        """Delete a key's files (complete, partial, marker) under its lock; raises if a run holds it."""
        lock = self.lock(key, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FeatureStoreError(f"{short(key)} is being written by another run; try again when it ends") from None
        try:
            paths = [p for p in (self.path(key), self.partial_path(key), self._used_marker(key)) if p.exists()]
            shards = self.root / "shards" / key
            if shards.is_dir():
                paths.append(shards)
            if not dry_run:
                for path in paths:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            return paths
        finally:
            lock.release()

    def gc(
        self, partial_older_than_s: float, unused_older_than_s: float | None = None, dry_run: bool = False
    ) -> list[tuple[Path, str]]:
        """Remove stale partial files and, optionally, complete files unused for a while.

        A partial file whose writer still runs (its lock is held) is kept.
        """
        now = time.time()
        removed: list[tuple[Path, str]] = []
        for path in sorted(self.root.glob("*.h5.partial")):
            age = now - path.stat().st_mtime
            if age >= partial_older_than_s:
                key = path.name.split(".")[0]
                try:
                    if self.remove(key, dry_run=dry_run):
                        removed.append((path, f"partial, untouched for {age / 3600:.1f} h"))
                except FeatureStoreError:
                    continue
        shards = self.root / "shards"
        for folder in sorted(shards.iterdir() if shards.is_dir() else []):  # partial shards of stopped workers
            if folder.is_dir():
                removed += self.shards(folder.name).gc(partial_older_than_s, dry_run=dry_run)
        if unused_older_than_s is not None:
            for key in list(self.keys()):
                used = self.last_used(key) or self.path(key).stat().st_mtime
                if now - used >= unused_older_than_s:
                    self.remove(key, dry_run=dry_run)
                    removed.append((self.path(key), f"unused for {(now - used) / 86400:.1f} days"))
        return removed

    # ------------------------------------------------------------------ listing

    def info(self, path: Path) -> FeatureInfo:
        """Describe a complete or partial file without trusting it."""
        complete = path.suffix == ".h5"
        key = path.name.split(".")[0]
        size = path.stat().st_size + sum(p.stat().st_size for p in (self.root / "shards" / key).glob("*.h5"))
        try:
            with _h5(path, "r") as fh:
                feats = fh["features"]
                return FeatureInfo(
                    key=key, path=path, complete=complete and bool(fh.attrs.get("complete", False)),
                    spec=_json_attr(fh.attrs, "spec", {}),
                    rows=int(fh.attrs.get("rows_done", 0)),
                    dims={layer: int(feats[layer].shape[1]) for layer in feats},
                    size_bytes=size, created_at=str(fh.attrs.get("created_at", "")),
                    dataset_root=str(fh.attrs.get("dataset_root", "")), last_used=self.last_used(key),
                    skipped=tuple(_json_attr(fh.attrs, "skipped", [])),
                )
        except (OSError, KeyError, ValueError) as exc:
            return FeatureInfo(key, path, False, {}, 0, {}, size, "", error=str(exc))

    def entries(self) -> list[FeatureInfo]:
        files = sorted(self.root.glob("*.h5")) + sorted(self.root.glob("*.h5.partial"))
        return [self.info(p) for p in files]
