"""What the feature cache holds (``transferpipe cache ls``) and removing what is stale (``cache gc``)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from storage.features import FeatureStore
from storage.h5file import FeatureStoreError, json_attr, open_h5
from storage.layout import CacheLayout, FeatureFiles
from storage.records import STAGE_FOLDERS, stage_folders


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


def info(store: FeatureStore, path: Path) -> FeatureInfo:
    """Describe a complete or partial file without trusting it (its size includes the pieces it joins).

    Raises FileNotFoundError when the file is gone (see ``entries``).
    """
    complete = path.suffix == ".h5"
    key = FeatureFiles.key_of(path)
    size = path.stat().st_size
    try:
        with open_h5(path, "r") as fh:
            feats = fh["features"]
            size += sum(p.stat().st_size for p in pieces_of(fh) if p.exists())
            return FeatureInfo(
                key=key, path=path, complete=complete and bool(fh.attrs.get("complete", False)),
                spec=json_attr(fh.attrs, "spec", {}),
                rows=int(fh.attrs.get("rows_done", 0)),
                dims={layer: int(feats[layer].shape[1]) for layer in feats},
                size_bytes=size, created_at=str(fh.attrs.get("created_at", "")),
                dataset_root=str(fh.attrs.get("dataset_root", "")), last_used=store.last_used(key),
                skipped=tuple(json_attr(fh.attrs, "skipped", [])),
            )
    except (OSError, KeyError, ValueError) as exc:
        if not path.exists():  # renamed (its extraction ended) or removed since it was listed
            raise FileNotFoundError(f"{path} is gone") from exc
        return FeatureInfo(key, path, False, {}, 0, {}, size, "", error=str(exc))


def pieces_of(fh: h5py.File) -> set[Path]:
    """The piece files a joined feature file reads (none for a file that holds its rows itself)."""
    folder = Path(fh.filename).parent
    return {(folder / vs.file_name).resolve() for ds in fh["features"].values() if ds.is_virtual
            for vs in ds.virtual_sources() if vs.file_name != "."}


def pieces_summary(store: FeatureStore) -> tuple[int, int, int]:
    """``(complete, partial, bytes)`` of the pieces that split files are joined from."""
    folder = store.pieces().root
    done, partial = list(folder.glob("*.h5")), list(folder.glob("*.h5.partial"))
    return len(done), len(partial), sum(_size(p) for p in done + partial)


def _size(path: Path) -> int:
    """The size of a file, 0 if a concurrent run renamed or removed it since it was listed."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def entries(store: FeatureStore) -> list[FeatureInfo]:
    """Every feature file, complete ones first; safe while other processes extract.

    A running extraction renames its ``.h5.partial`` to ``.h5`` when it ends,
    and ``cache gc`` removes files: the partial files are listed first (so a
    file renamed meanwhile is still found as complete) and a file gone between
    the listing and its reading is left out instead of failing the caller.
    """
    folder = store.files.folder
    partial = sorted(folder.glob("*.h5.partial"))
    found: list[FeatureInfo] = []
    for path in sorted(folder.glob("*.h5")) + partial:
        try:
            found.append(info(store, path))
        except FileNotFoundError:
            continue
    return found


def collect(
    store: FeatureStore, partial_older_than_s: float, unused_older_than_s: float | None = None, dry_run: bool = False
) -> list[tuple[Path, str]]:
    """Remove stale partial files (pieces included), optionally complete files unused for a while, and the
    pieces no feature file joins any more.

    A partial file whose writer still runs (its lock is held) is kept, and so is
    a piece younger than ``partial_older_than_s`` (a running extraction may
    not have joined it yet).
    """
    now = time.time()
    removed: list[tuple[Path, str]] = []
    for path in sorted(store.files.folder.glob("*.h5.partial")):
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:  # its extraction finished (renamed) since the listing
            continue
        if age >= partial_older_than_s:
            try:
                if store.remove(FeatureFiles.key_of(path), dry_run=dry_run):
                    removed.append((path, f"partial, untouched for {age / 3600:.1f} h"))
            except FeatureStoreError:
                continue
    if unused_older_than_s is not None:
        for key in list(store.keys()):
            used = store.last_used(key) or store.path(key).stat().st_mtime
            if now - used >= unused_older_than_s:
                store.remove(key, dry_run=dry_run)
                removed.append((store.path(key), f"unused for {(now - used) / 86400:.1f} days"))
    pieces = store.pieces()
    if pieces.root.is_dir() and not pieces.root.is_symlink():  # never follow a link out of the cache
        removed += collect(pieces, partial_older_than_s, dry_run=dry_run)  # partial pieces of stopped runs
        # a running extraction's complete pieces are joined only at its end: while any writer holds a lock,
        # no unjoined piece is removed (`gc --partial-hours 0` used to fail a running extraction)
        if not _writing(store) and not _writing(pieces):
            removed += _unused_pieces(store, {p for p, _ in removed}, partial_older_than_s, now, dry_run)
    return removed


def _writing(store: FeatureStore) -> bool:
    """Whether a writer holds any of the store's locks now (an extraction or a join is running)."""
    from filelock import FileLock, Timeout

    for path in store.files.folder.glob("*.h5.lock"):
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        except OSError:
            continue
        lock.release()
    return False


def _unused_pieces(store: FeatureStore, gone: set[Path], older_than_s: float, now: float,
                   dry_run: bool) -> list[tuple[Path, str]]:
    """Complete pieces that no feature file (complete or partial, except those just removed) joins."""
    used: set[Path] = set()
    folder = store.files.folder
    for path in [*folder.glob("*.h5"), *folder.glob("*.h5.partial")]:
        if path in gone:
            continue
        try:
            with open_h5(path, "r") as fh:
                used |= pieces_of(fh)
        except (OSError, KeyError, ValueError):
            return []  # a file we cannot read may use any piece: remove none
    pieces, removed = store.pieces(), []
    for path in sorted(pieces.root.glob("*.h5")):
        age = now - path.stat().st_mtime
        if path.resolve() in used or age < older_than_s:
            continue
        try:
            if pieces.remove(FeatureFiles.key_of(path), dry_run=dry_run):
                removed.append((path, f"a piece no feature file joins, {age / 3600:.1f} h old"))
        except FeatureStoreError:
            continue
    return removed + _forgotten_tails(pieces, {p for p, _ in removed}, dry_run)


def _forgotten_tails(pieces: FeatureStore, gone: set[Path], dry_run: bool) -> list[tuple[Path, str]]:
    """The records of a split's last piece (``FeatureStore.remember_tail``) whose piece is gone (or going)."""
    forgotten = []
    for record in sorted(pieces.root.glob("*.tail.json")):
        found = pieces.tail(FeatureFiles.key_of(record))
        if found is None or pieces.path(found[0]) in gone or not pieces.path(found[0]).exists():
            if not dry_run:
                record.unlink(missing_ok=True)
            forgotten.append((record, "remembers a split's last piece that is gone"))
    return forgotten


def stage_artifacts(cache_dir: Path) -> dict[str, list[Path]]:
    """Every artifact of the later stages by its key (reports by the 12 digits their folder is named by):
    heads, fine-tuning runs, evaluations, scores, remembered metrics, embedding maps, and the entries of every
    folder a files class declares (:func:`storage.records.stage_folders`)."""
    layout, found = CacheLayout(cache_dir), {}
    folders = [*layout.heads().glob("*"), *layout.finetune_runs().glob("*"), *layout.reports("_").parent.glob("*/*"),
               *layout.scores("*").parent.glob("*.json"), *layout.metrics("*").parent.glob("*.json"),
               *(p for folder in stage_folders(cache_dir) for p in folder.glob("*")),
               *layout.embedding_map("*").parent.glob("*.png")]
    for path in folders:
        if not path.name.startswith(".") and path.name != "quarantine":  # set aside, not a stage's artifact
            found.setdefault(path.name.split(".")[0], []).append(path)
    return found


def remove_artifacts(cache_dir: Path, prefixes: list[str], dry_run: bool = False) -> list[Path]:
    """Remove the stage artifacts whose keys start with ``prefixes`` (each must match one key); the next run that
    needs them recomputes them. Raises KeyError naming the prefixes that match none or several."""
    known = stage_artifacts(cache_dir)
    matched, problems = [], []
    for prefix in prefixes:
        keys = [k for k in known if k.startswith(prefix.lower()) or prefix.lower().startswith(k)]
        if len(keys) == 1:
            matched += known[keys[0]]
        else:
            problems.append(f"{prefix!r} matches {'no' if not keys else len(keys)} cached keys")
    if problems:
        raise KeyError(f"in {cache_dir}: " + "; ".join(problems))
    if not dry_run:
        for path in matched:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return matched


#: temporary files of writes that a kill interrupted: atomic records, checkpoints, head folders, exports, indexes, maps
TEMPORARY = ("*/*.tmp", "*/*/*.tmp", "*/*/*/*.tmp", "heads/.*-*", "maps/*.tmp-*",
             *(f"{cls.cache_folder}/*.tmp-*" for cls in STAGE_FOLDERS.values()))


def collect_scans(cache_dir: Path, dry_run: bool = False) -> list[tuple[Path, str]]:
    """Remove remembered WebDataset shard scans whose shard is gone or has changed since (never read again)."""
    removed = []
    for path in sorted(CacheLayout(cache_dir).shard_scan("*").parent.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            st = os.stat(record["shard"])
            stale = (st.st_size, st.st_mtime_ns) != (record["size"], record["mtime_ns"])
        except FileNotFoundError:
            stale = True
        except (OSError, ValueError, KeyError, TypeError):
            stale = True  # unreadable, or written by an older version
        if stale:
            if not dry_run:
                path.unlink(missing_ok=True)
            removed.append((path, "a shard scan whose shard is gone or changed"))
    return removed


def _through_link(root: Path, path: Path) -> bool:
    """Whether a folder between ``root`` and ``path`` is a symbolic link."""
    parent = path.parent
    while parent != root and root in parent.parents:
        if parent.is_symlink():
            return True
        parent = parent.parent
    return False


def collect_temporary(cache_dir: Path, older_than_s: float, dry_run: bool = False) -> list[tuple[Path, str]]:
    """Remove what interrupted writes left behind (their writer is gone when they are this old); links are
    removed, never followed."""
    now, removed = time.time(), []
    for pattern in TEMPORARY:
        for path in sorted(Path(cache_dir).glob(pattern)):
            if _through_link(Path(cache_dir), path):
                continue  # glob descends into linked folders: what lies behind a link is not the cache's
            age = now - path.lstat().st_mtime
            if age < older_than_s or (pattern.startswith("heads") and not path.is_dir()):
                continue
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append((path, f"left by an interrupted write, untouched for {age / 3600:.1f} h"))
    return removed
