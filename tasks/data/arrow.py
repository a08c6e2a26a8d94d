"""Tables of images (Parquet, CSV, JSON Lines) read with pyarrow: the columns a scan needs, in row batches, and
one row's image bytes by its row number.

A 1M-row table never loads whole: a scan reads the label, split and image-path
columns only (for a Hugging Face ``image`` struct ``{bytes, path}`` just its
``path``), batch by batch; reading an image reads its row group's image column
once per process (the two most recent are kept), so extraction, which reads
rows in order, reads each row group once.
"""
from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json",
           ".json": "json"}
BATCH_ROWS = 65_536


class TableError(ValueError):
    """A table or column that cannot be read as asked; the message names the file and column."""


def format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise TableError(f"{path}: unknown table format {ext!r}; use .parquet, .csv or .jsonl")
    return FORMATS[ext]


@dataclass(frozen=True)
class Column:
    """How a table holds its images: ``bytes`` (binary, or a struct with ``bytes``) or ``path`` (strings)."""

    name: str
    holds: str  # "bytes" | "path"
    struct: bool  # a struct {bytes, path}: the Hugging Face layout


def image_column(path: str, name: str) -> Column:
    """How ``path``'s column ``name`` holds images (remembered per process while the file is unchanged: every
    image read asks)."""
    st = os.stat(path)
    return _image_column(path, st.st_size, st.st_mtime_ns, name)


@functools.lru_cache(maxsize=64)
def _image_column(path: str, size: int, mtime_ns: int, name: str) -> Column:
    import pyarrow as pa

    schema = _schema(path)
    if name not in schema.names:
        raise TableError(f"{path}: no column {name!r} for data.image; columns: {', '.join(schema.names)}")
    kind = schema.field(name).type
    if pa.types.is_struct(kind):
        fields = [kind.field(i).name for i in range(kind.num_fields)]
        if "bytes" not in fields:
            raise TableError(f"{path}: column {name!r} is a struct without a 'bytes' field ({', '.join(fields)})")
        return Column(name, "bytes", True)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return Column(name, "bytes", False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return Column(name, "path", False)
    raise TableError(f"{path}: column {name!r} is {kind}; data.image must hold image bytes, a "
                     "{bytes, path} struct, or image paths")


def class_names(path: str, label: str) -> list[str] | None:
    """The label column's class names from the Hugging Face ``ClassLabel`` in a Parquet schema, if there."""
    if format_of(path) != "parquet":
        return None
    meta = (_schema(path).metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][label]
    except (TypeError, ValueError, KeyError):
        return None
    return list(feature["names"]) if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None


def _schema(path: str):
    fmt = format_of(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path)
        return next(batches(path, None), None).schema if fmt == "csv" else _json(path).schema
    except (OSError, ValueError) as exc:
        if isinstance(exc, TableError):
            raise
        raise TableError(f"cannot read table {path}: {exc}") from None


def _json(path: str):
    import pyarrow.json as pj

    return pj.read_json(path)


def batches(path: str, columns: list[str] | None) -> Iterator[Any]:
    """The table's rows in record batches (only ``columns``; dotted names reach into structs)."""
    fmt = format_of(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        elif fmt == "csv":
            import pyarrow.csv as pc

            options = pc.ConvertOptions(include_columns=columns) if columns else None
            yield from pc.open_csv(path, convert_options=options)
        else:
            table = _json(path)
            yield from (table.select(columns) if columns else table).to_batches(BATCH_ROWS)
    except (OSError, ValueError, KeyError) as exc:
        raise TableError(f"cannot read table {path}: {exc}") from None


def image_bytes(path: str, row: int, column: Column) -> bytes | None:
    """Row ``row``'s image bytes (Parquet): its row group's image column is read once and kept.

    A Hugging Face struct whose ``bytes`` is null (``Dataset.cast_column("image", Image())`` on file paths, then
    ``to_parquet``) names its image by ``path``: read from that file, relative to the table's folder unless
    absolute (``datasets`` resolves it so when it loads the table).
    """
    st = os.stat(path)
    group, first = _row_group(path, st.st_size, st.st_mtime_ns, row)
    with _READING:  # threads asking for the same row group wait for one read of it, not read it each
        images = _group_images(path, st.st_size, st.st_mtime_ns, group, column.name)
    value = images[row - first].as_py()
    if not column.struct or value is None:
        return value
    if value.get("bytes") is None and value.get("path"):
        return _referenced(path, row, value["path"])
    return value.get("bytes")


def referenced_file(table: str, name: str) -> str:
    """Where a struct's ``path`` points: absolute as it is, relative to the table's folder."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(table)), name)


def _referenced(table: str, row: int, name: str) -> bytes:
    target = referenced_file(table, name)
    try:
        with open(target, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise FileNotFoundError(f"{table} row {row}: its image bytes are null and its path {name!r} cannot be read "
                                f"({target}: {exc.strerror or exc}); a relative path is read from the table's "
                                "folder") from None


def referenced_paths(path: str, column: Column) -> list[str | None] | None:
    """Every row's struct ``path`` (None where there is none), or None when the column is not a struct with one
    (remembered per process while the file is unchanged: predictions ask block by block)."""
    st = os.stat(path)
    return _referenced_paths(path, st.st_size, st.st_mtime_ns, column)


@functools.lru_cache(maxsize=8)
def _referenced_paths(path: str, size: int, mtime_ns: int, column: Column) -> list[str | None] | None:
    if not column.struct or "path" not in _schema(path).field(column.name).type.names:
        return None
    out: list[str | None] = []
    for batch in batches(path, [f"{column.name}.path"]):
        out += [None if v is None else v["path"] for v in batch.column(0).to_pylist()]
    return out


@functools.lru_cache(maxsize=64)
def _starts(path: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    starts, total = [], 0
    for g in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(g).num_rows
    return (*starts, total)


def _row_group(path: str, size: int, mtime_ns: int, row: int) -> tuple[int, int]:
    import bisect

    starts = _starts(path, size, mtime_ns)
    if not 0 <= row < starts[-1]:
        raise FileNotFoundError(f"{path} has no row {row} (it has {starts[-1]}; the table changed since the scan)")
    group = bisect.bisect_right(starts, row) - 1
    return group, starts[group]


#: held while a row group's image column is read: the thread pool that checks headers read the same row group once
#: per thread (eight reads of one 360 MB row group at once, each also copied to Python: 7.2 GB RSS)
_READING = threading.Lock()


@functools.lru_cache(maxsize=2)
def _group_images(path: str, size: int, mtime_ns: int, group: int, column: str) -> Any:
    """A row group's image column as Arrow data (one copy; a row's value becomes Python bytes when it is read)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column)
