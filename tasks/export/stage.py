"""Features out of the cache: one split's cached layer as Parquet, or as NumPy with aligned Parquet metadata.

- ``parquet``: ``<split>.parquet``, one row per image: ``id`` (the image's path relative to the data root, or
  ``shard/sample key`` for WebDataset, the row key for tables), ``path`` (where the image is: its file, a shard's
  ``file#key``, a Hugging Face table's struct ``path``), ``label`` (int), ``class`` (string), ``split``
  and ``embedding`` (``fixed_size_list<float16|float32>[D]``). Written in row groups of ``row_group_rows``
  from the HDF5 file's chunks, so memory stays at one row group whatever the split's size; pyarrow, pandas,
  polars and DuckDB read it as it is.
- ``npy``: ``<split>.npy`` (one ``(rows, D)`` array, ``np.load(path, mmap_mode="r")``) and ``<split>.parquet``
  with the same columns minus ``embedding``, aligned by row.

The HDF5 file stays the source of truth: an export reads it checksum-verified and is refused (nothing
written) when it fails. Each export is a cached stage keyed by the feature key, layer, format, dtype, row
group size and code version; it is written into a temporary folder and renamed into ``exports/<key>/`` when
complete (``StageFiles.staged``), so a crash leaves no half export behind. ``copy_out`` copies the files to a user's folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from storage.features import FeatureStore
from storage.h5file import CorruptFeatureFile, FeatureStoreError
from storage.keys import short
from storage.records import ExportFiles
from tasks.export.plan import ExportConfig, ExportPlan, ExportResult, _saved, is_stored  # noqa: F401 - ExportConfig: the stage's config, also from here


class ExportRefused(ValueError):
    """The feature file failed its checksum: nothing was exported (the file was quarantined)."""


def export_split(plan: ExportPlan) -> ExportResult:
    """Write the split's export (or reuse the finished one) and return where its files are."""
    started = time.perf_counter()
    if (saved := _saved(plan)) is not None:
        return ExportResult.model_validate({**saved, "folder": plan.files.folder, "cache_hit": True, "seconds": 0.0})
    with plan.files.staged(sound=lambda: is_stored(plan)) as staged:
        rows, dim, dtype, sizes = _write(plan, staged)
        result = ExportResult(key=plan.key, split=plan.split, format=plan.format, rows=rows, dim=dim, dtype=dtype,
                              folder=plan.files.folder, files=sizes, rows_written=rows, cache_hit=False, seconds=0.0)
        staged.write_spec(plan.spec)
        staged.write_result(result.model_dump_json(exclude={"folder", "cache_hit", "seconds", "work_fields"}))
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def _write(plan: ExportPlan, out: ExportFiles) -> tuple[int, int, str, dict[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = FeatureStore(plan.cache_dir)
    if store.lookup(plan.features) is None:
        raise FeatureStoreError(f"no complete feature file for the {plan.split} split (key {short(plan.features)}): "
                                "run transferpipe extract CONFIG first")
    rows = store.rows(plan.features, plan.layer)
    ids = _checked_ids(store, plan)
    dtype = np.dtype(rows.dtype if plan.dtype == "stored" else plan.dtype)
    value_type = pa.float16() if dtype == np.float16 else pa.float32()
    meta = {"transferpipe": json.dumps({"split": plan.split, "layer": plan.layer, "features": plan.features,
                                        "classes": rows.classes, "export": plan.key})}
    columns = [("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("class", pa.string()),
               ("split", pa.string())]
    where = _locations(plan)
    if plan.format == "parquet":
        columns.append(("embedding", pa.list_(value_type, rows.dim)))
    schema = pa.schema(columns, metadata=meta)
    classes = np.asarray(rows.classes, dtype=object)
    array = (np.lib.format.open_memmap(out.array(plan.split), mode="w+", dtype=dtype, shape=(rows.rows, rows.dim))
             if plan.format == "npy" else None)
    try:
        with pq.ParquetWriter(out.table(plan.split), schema, compression="zstd",
                              use_dictionary=["label", "class", "split"]) as writer:
            for start, block in rows.chunks(plan.row_group_rows):
                end = start + len(block)
                labels = rows.labels[start:end]
                data = {"id": ids[start:end], "path": where(ids[start:end]), "label": labels, "class": classes[labels], "split": [plan.split] * len(block)}
                block = np.ascontiguousarray(block, dtype=dtype)
                if array is not None:
                    array[start:end] = block
                else:
                    data["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), rows.dim)
                writer.write_table(pa.table(data, schema=schema), row_group_size=len(block))
    except CorruptFeatureFile as exc:
        raise ExportRefused(f"export of the {plan.split} split refused: {exc}") from exc
    if array is not None:
        array.flush()
        del array
    sizes = {p.name: p.stat().st_size for p in sorted(out.folder.iterdir())}
    return rows.rows, rows.dim, dtype.name, sizes


def _locations(plan: ExportPlan):
    """Ids to where the images are (:meth:`tasks.data.config.DataSource.locations`); the ids themselves when the
    manifest is not known."""
    if plan.manifest is None or not Path(plan.manifest).is_file():
        return lambda ids: list(ids)
    from tasks.data.config import get
    from tasks.data.manifest import Manifest

    manifest = Manifest.load(plan.manifest)
    return lambda ids: get(manifest.source).locations(Path(manifest.root), list(ids), manifest.options)


def _checked_ids(store: FeatureStore, plan: ExportPlan) -> list[str]:
    """The rows' ids, verified against the file's checksum of them (every export column comes checked)."""
    try:
        return store.paths(plan.features, checked=True)
    except CorruptFeatureFile as exc:
        raise ExportRefused(f"export of the {plan.split} split refused: {exc}, and the next extraction "
                            "recomputes it") from exc


def check_out(out: Path) -> None:
    """``--out`` must be a folder (or not exist yet): checked before anything is exported."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder: name a folder for the exported files")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: this user cannot write into that folder")


def copy_out(results: list[ExportResult], out: Path) -> list[Path]:
    """Copy each export's data files (not its spec and marker) into ``out``; each lands whole (written beside
    and renamed), replacing a file of the same name. A copy that fails (a full disk) leaves nothing behind."""
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        for path in result.paths:
            target = out / path.name
            tmp = out / f".{path.name}.tmp-{os.getpid()}"
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise OSError(f"cannot copy {path.name} into --out {out}: {exc.strerror or exc}; the export "
                                  f"stays in the cache ({path.parent})") from None
                raise
            written.append(target)
    return written
