"""The feature store: the complete HDF5 feature files of one folder, the source of truth for extraction.

A lookup serves a file only when it passes its invariants (a bad one is
quarantined and the caller recomputes); a read verifies the checksums of what
it reads. One writer per key: an OS lock that dies with its holder. The file
format is :mod:`storage.h5file`, writing is :mod:`storage.writer`, joining a
split's pieces :mod:`storage.piece_join`, listing and gc :mod:`storage.inventory`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from storage.h5file import (
    CorruptFeatureFile, FeatureStoreError, LayerNotStored, bytes_view, check_invariants, file_checksums, json_attr,
    mark_used, open_h5, quarantine, transient, values_checksum,
)
from storage.atomic import write_json
from storage.keys import short
from storage.layout import CacheLayout, FeatureFiles
from storage.writer import FeatureWriter

__all__ = ["CorruptFeatureFile", "FeatureRows", "FeatureSet", "FeatureStore", "FeatureStoreError", "LayerNotStored"]


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
class FeatureRows:
    """One layer of a complete feature file, left on disk and read in chunks in its stored dtype.

    For splits bigger than memory: ``chunks()`` yields ``(start, block)`` in row
    order, and the first full pass verifies the layer's checksum as it goes (a
    mismatch quarantines the file, as :meth:`FeatureStore.read` does).
    Labels (8 bytes a row) are in memory.
    """

    store: FeatureStore
    key: str
    layer: str
    rows: int
    dim: int
    dtype: np.dtype
    labels: np.ndarray
    classes: list[str]
    checksum: str

    @property
    def path(self) -> Path:
        return self.store.path(self.key)

    @property
    def nbytes_float32(self) -> int:
        return self.rows * self.dim * 4

    def chunks(self, rows: int = 16384, verify: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        import hashlib

        digest = hashlib.sha256() if verify else None
        try:
            with open_h5(self.path, "r") as fh:
                ds = fh["features"][self.layer]
                for start in range(0, self.rows, rows):
                    block = ds[start : start + rows]
                    if digest is not None:
                        digest.update(bytes_view(block))
                    yield start, block
        except (OSError, KeyError) as exc:
            raise FeatureStoreError(f"cannot read {self.path} ({exc})") from exc
        if digest is not None and "sha256:" + digest.hexdigest() != self.checksum:
            self.store.quarantine(self.path, "corrupt", f"features/{self.layer} checksum mismatch")
            raise CorruptFeatureFile(f"{self.path}: checksum mismatch in features/{self.layer}; it was quarantined "
                                     "and the next extraction recomputes it")

    def take(self, index: np.ndarray) -> np.ndarray:
        """The rows at ``index`` (sorted, unique), in the stored dtype."""
        with open_h5(self.path, "r") as fh:
            return fh["features"][self.layer][np.asarray(index, dtype=np.int64)]


class FeatureStore:
    """The feature files of one folder: the cache's ``features/`` or its ``pieces/``."""

    def __init__(self, cache_dir: str | Path | None = None, *, files: FeatureFiles | None = None) -> None:
        """The cache's store (``cache_dir``), or the one in ``files``' folder (made by its first writer)."""
        self.files = files if files is not None else CacheLayout(Path(cache_dir)).features
        if files is None:
            self.files.folder.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self.files.folder

    def pieces(self) -> FeatureStore:
        """The store of the pieces that splits' files are joined from."""
        return FeatureStore(files=self.files.pieces())

    def path(self, key: str) -> Path:
        return self.files.complete(key)

    def remember_tail(self, tail: str, key: str, items: int) -> None:
        """Piece ``key`` (``items`` manifest items) was the last of its split: a piece that grows from it (a
        folder that gained files after it) copies its rows instead of extracting them again."""
        write_json(self.files.tail(tail), {"piece": key, "items": items})

    def tail(self, tail: str) -> tuple[str, int] | None:
        """The piece remembered under a tail key and its item count, or None (never remembered, unreadable)."""
        try:
            found = json.loads(self.files.tail(tail).read_text(encoding="utf-8"))
            return str(found["piece"]), int(found["items"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def partial_path(self, key: str) -> Path:
        return self.files.partial(key)

    def lock(self, key: str, timeout: float = -1) -> FileLock:
        """One writer per key: an OS lock (flock) that dies with its holder."""
        self.files.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.files.lock(key)), timeout=timeout)

    def writer(self, key: str, **kwargs: Any) -> FeatureWriter:
        return FeatureWriter(self.files, key, **kwargs)

    def write(self, key: str, blocks: Any, labels: np.ndarray, *, classes: list[str], dims: dict[str, int],
              spec: dict[str, Any], paths: list[str] | None = None, batch_size: int = 4096) -> Path:
        """A complete file from ``blocks`` (an iterable of ``{layer: rows}``), under the key's lock.

        For features computed elsewhere (and synthetic data at any scale: blocks
        may be generated one at a time, so the split never has to fit in memory).
        """
        with self.lock(key):
            with self.writer(key, spec=spec, classes=classes, dims=dims, total=len(labels), batch_size=batch_size,
                             versions={}) as writer:
                for block in blocks:
                    writer.append(block)
                return writer.complete(np.asarray(labels, dtype=np.int64),
                                       paths if paths is not None else [f"row{i}" for i in range(len(labels))])

    def quarantine(self, path: Path, reason: str, why: str) -> Path:
        return quarantine(self.files, path, reason, why)

    def lookup(self, key: str, mark: bool = True) -> Path | None:
        """The complete file for ``key`` if it exists and passes its cheap invariants.

        A file that fails them is quarantined and ``None`` is returned, so the
        caller recomputes: a cache hit never points at a bad file. ``mark``:
        record the use (for ``cache gc --unused``; pieces go by the files that join them).
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with open_h5(path, "r") as fh:
                check_invariants(fh, key)
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            if transient(exc):
                raise FeatureStoreError(f"cannot open {path} now ({exc}); the file is kept, retry") from exc
            self.quarantine(path, "corrupt", str(exc))
            return None
        if mark:
            self.mark_used(key)
        return path

    def read(self, key: str, layers: list[str] | None = None) -> FeatureSet:
        """Load a complete file, checking every checksum of what is read (a bad file is quarantined)."""
        path = self.path(key)
        try:
            with open_h5(path, "r") as fh:
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
                stored = json_attr(fh.attrs, "checksums", {})
                attrs = {name: json_attr(fh.attrs, name, []) for name in ("classes", "spec", "skipped")}
            bad = [name for name, v in values.items() if stored.get(name) != values_checksum(v)]
            if bad:
                raise CorruptFeatureFile(f"{path}: checksum mismatch in {', '.join(bad)}")
        except FileNotFoundError:
            raise FeatureStoreError(f"no feature file for key {short(key)} at {path}") from None
        except LayerNotStored:
            raise  # a question about the file, not a fault in it
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            if transient(exc):
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

    def rows(self, key: str, layer: str) -> FeatureRows:
        """One layer of a complete file for chunked reading; only its labels are loaded (and checked)."""
        path = self.path(key)
        try:
            with open_h5(path, "r") as fh:
                check_invariants(fh, key)
                if layer not in fh["features"]:
                    raise LayerNotStored(f"feature file {short(key)} has no layer(s) {[layer]}, only "
                                         f"{sorted(fh['features'])}; add them to backbone.layers to extract them")
                ds = fh["features"][layer]
                labels = fh["labels"][()]
                stored = json_attr(fh.attrs, "checksums", {})
                classes = json_attr(fh.attrs, "classes", [])
                rows, dim, dtype = int(ds.shape[0]), int(ds.shape[1]), ds.dtype
        except FileNotFoundError:
            raise FeatureStoreError(f"no feature file for key {short(key)} at {path}") from None
        if stored.get("labels") != values_checksum(labels):
            self.quarantine(path, "corrupt", "labels checksum mismatch")
            raise CorruptFeatureFile(f"{path}: checksum mismatch in labels; it was quarantined")
        self.mark_used(key)
        return FeatureRows(self, key, layer, rows, dim, dtype, labels, classes, stored.get(f"features/{layer}", ""))

    def paths(self, key: str, checked: bool = False) -> list[str]:
        """Only the row paths of a complete file (cheap checks; no feature is read). ``checked``: also against
        the file's checksum of them; a mismatch quarantines the file and raises :class:`CorruptFeatureFile`."""
        path = self.path(key)
        with open_h5(path, "r") as fh:
            check_invariants(fh, key)
            ids = list(fh["paths"].asstr()[()])
            stored = json_attr(fh.attrs, "checksums", {}).get("paths")
        if checked and stored != values_checksum(ids):
            self.quarantine(path, "corrupt", "paths checksum mismatch")
            raise CorruptFeatureFile(f"{path}: checksum mismatch in paths; it was quarantined")
        return ids

    def verify(self, key: str) -> list[str]:
        """Recompute the checksums of a complete file; return the problems found. In a file joined from pieces a
        mismatch is traced to its pieces, which are quarantined (the next extraction recomputes only them)."""
        path = self.path(key)
        try:
            with open_h5(path, "r") as fh:
                check_invariants(fh, key)
                stored = json_attr(fh.attrs, "checksums", {})
                actual = file_checksums(fh)
                pieces = sorted({vs.file_name for ds in fh["features"].values() if ds.is_virtual
                                 for vs in ds.virtual_sources()})
        except (OSError, KeyError, ValueError, CorruptFeatureFile) as exc:
            return [f"{path}: {exc}"]
        problems = [f"{path}: {name} checksum mismatch" for name in sorted(actual) if stored.get(name) != actual[name]]
        if problems and pieces:
            store = self.pieces()
            for name in pieces:
                piece = self.root / name
                bad = store.verify(FeatureFiles.key_of(piece))
                if bad:
                    problems += bad
                    store.quarantine(piece, "corrupt", "; ".join(bad))
        return problems

    def keys(self) -> Iterator[str]:
        for path in sorted(self.root.glob("*.h5")):
            yield path.name[: -len(".h5")]

    def all_keys(self) -> list[str]:
        """Keys with a complete or a partial file."""
        names = {FeatureFiles.key_of(p) for p in [*self.root.glob("*.h5"), *self.root.glob("*.h5.partial")]}
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

    def mark_used(self, key: str) -> None:
        mark_used(self.files, key)

    def last_used(self, key: str) -> float | None:
        marker = self.files.used_marker(key)
        return marker.stat().st_mtime if marker.exists() else None

    def remove(self, key: str, dry_run: bool = False) -> list[Path]:
        """Delete a key's files (complete, partial, marker) under its lock; raises if a run holds it.

        A split's pieces stay (other splits may hold them); ``cache gc`` removes those no file uses."""
        lock = self.lock(key, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise FeatureStoreError(f"{short(key)} is being written by another run; try again when it ends") from None
        try:
            paths = [p for p in (self.path(key), self.partial_path(key), self.files.used_marker(key)) if p.exists()]
            if not dry_run:
                for path in paths:
                    path.unlink()
            return paths
        finally:
            lock.release()

