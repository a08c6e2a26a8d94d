"""The ``table`` source: Parquet, CSV or JSON Lines tables read through :mod:`tasks.data.arrow`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Any

from storage.keys import file_identities
from tasks.data.config import DataConfig, DataSource, Scan
from tasks.data.errors import DataError
from tasks.data.labels import bad_items, labelled, sorted_labels

TABLE_ROW = re.compile(r"^(?P<file>.+\.(?:parquet|pq))#(?P<row>\d+)$")


ROW_DIGITS = 9  # ids sort in row order (extraction then reads each row group once)


SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


class Table(DataSource):
    """One row per image in Parquet, CSV or JSON Lines tables (``data.path``, a file or a glob), read with pyarrow
    in row batches. ``data.image`` holds the image bytes (binary, or the Hugging Face struct ``{bytes, path}``)
    or a path relative to ``data.root`` (default: the table's folder); ``data.label`` an integer or a class
    name; ``data.split`` (optional) train/val/test. A row's id: its image path, or ``<table file>#<row>`` (the
    row number zero-padded to 9 digits) when the table holds the bytes. The id is not the Hugging Face struct's
    ``path``: those are often bare file names that repeat across tables, and an id never repeats; predictions
    carry that ``path`` beside the id (:meth:`locations`)."""

    name = "table"
    needs_root = False
    fields = ("path", "image", "label", "split")
    required = {"path": ": a .parquet, .csv or .jsonl file, or a glob of them"}

    def options(self, cfg: DataConfig) -> dict[str, str]:
        return {"image": cfg.image}

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        from tasks.data import arrow

        files = _table_files(cfg.path)
        try:
            column = arrow.image_column(files[0], cfg.image)
            named = arrow.class_names(files[0], cfg.label)
        except arrow.TableError as exc:
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
                if arrow.image_column(file, cfg.image) != column:
                    raise DataError(f"{file}: column {cfg.image!r} holds other data than in {files[0]}")
                for batch in arrow.batches(file, wanted):
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
            except arrow.TableError as exc:
                raise DataError(str(exc)) from None
        if holds_paths:
            raw = _files_named(cfg, root, raw, bad)
        classes = named or sorted_labels(label for pairs in raw.values() for _, label in pairs)
        items = labelled(raw, classes, named is not None, bad, "is not one of the classes")
        left_out = bad_items(bad, f"row(s) in {cfg.path}", cfg.on_bad_image)
        if len(classes) < 2:
            raise DataError(f"{cfg.path}: found {len(classes)} class(es) {classes}; a classifier needs at least 2")
        return Scan(root, classes, {split: sorted(pairs) for split, pairs in items.items()}, left_out)

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Rows holding bytes: the table's size and mtime with the row number, or the bytes' sha256; rows holding
        paths: as files."""
        import hashlib

        from tasks.data import arrow

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
                    referenced[table] = arrow.referenced_paths(table, arrow.image_column(table, options["image"]))
                name = referenced[table] and referenced[table][int(row["row"])]
                if name and os.path.isfile(target := arrow.referenced_file(table, name)):
                    ref = os.stat(target)
                    out[-1] += [ref.st_size, ref.st_mtime_ns]
        return out

    def locations(self, root: Path, items: list[str], options: dict[str, str]) -> list[str]:
        """A row holding a path: that file. A row holding bytes: the Hugging Face struct's ``path`` as the table
        holds it (what the user's dataset calls the image: often a bare file name, so it is not the id), else
        ``<table file>#<row>``."""
        from tasks.data import arrow

        out, named = [], {}
        for item in items:
            row = TABLE_ROW.match(item)
            if row is None:
                out.append(os.path.join(root, item))
                continue
            table = os.path.join(root, row["file"])
            if table not in named:
                named[table] = arrow.referenced_paths(table, arrow.image_column(table, options["image"]))
            name = named[table] and named[table][int(row["row"])]
            out.append(name or f"{table}#{int(row['row'])}")
        return out

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        import io

        from tasks.data import arrow

        row = TABLE_ROW.match(item)
        if row is None:
            return open(os.path.join(root, item), "rb")
        path = os.path.join(root, row["file"])
        data = arrow.image_bytes(path, int(row["row"]), arrow.image_column(path, options["image"]))
        if data is None:
            raise OSError(f"{path} row {row['row']} has no image bytes (and no path to read them from)")
        return io.BytesIO(data)


def _files_named(cfg: DataConfig, root: Path, raw: dict[str, list[tuple[str, str]]],
                 bad: list[tuple[str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The rows whose image file exists (and, with ``data.paths: inside_root``, is under the root); the others
    join ``bad``."""
    if cfg.paths == "inside_root":
        inside = os.path.realpath(root)
        outside = {item for pairs in raw.values() for item, _ in pairs
                   if os.path.commonpath([inside, os.path.realpath(os.path.join(root, item))]) != inside}
        bad += sorted((f"{item} (row of {cfg.path})", f"outside data.root {root} (data.paths: inside_root)", split)
                      for split, pairs in raw.items() for item, _ in pairs if item in outside)
        raw = {s: [(i, y) for i, y in pairs if i not in outside] for s, pairs in raw.items()}
    gone = {item for pairs in raw.values() for item, _ in pairs if not os.path.isfile(os.path.join(root, item))}
    bad += sorted((f"{item} (row of {cfg.path})", f"no such file under {root}", split)
                  for split, pairs in raw.items() for item, _ in pairs if item in gone)
    return {s: [(i, y) for i, y in pairs if i not in gone] for s, pairs in raw.items()}


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
