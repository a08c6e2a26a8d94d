"""``transferpipe export``: cached features as Parquet or NumPy, checked against the HDF5 file they come from."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.planning.explain import explain
from flows.execution.local import local_run_settings
from flows.pipeline import pipeline_flow
from storage.features import FeatureStore
from tasks.export.plan import ExportConfig, plan_export
from tasks.export.stage import ExportRefused, export_split
from tasks.extract.stage import extract_split
from helpers import flip_a_feature_byte, split_plans


def exported(cfg, **over):
    cfg = cfg.model_copy(update={"export": ExportConfig(**over)})
    with local_run_settings():
        return cfg, pipeline_flow(cfg, stop_after="export")


def stored(cfg, split: str, layer: str = "penultimate"):
    plan = split_plans(cfg)[split]
    return FeatureStore(cfg.cache_dir).read(plan.key, [layer])


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_parquet_holds_every_row_as_stored_in_row_groups_and_a_second_export_is_a_hit(tiny_config):
    cfg = tiny_config()
    cfg, first = exported(cfg, row_group_rows=4)
    assert [r.split for r in first.exports] == ["train", "val", "test"]
    assert not any(r.cache_hit for r in first.exports)
    for r in first.exports:
        (path,) = r.paths
        table = pq.read_table(path)
        fs = stored(cfg, r.split)
        assert table.column_names == ["id", "path", "label", "class", "split", "embedding"]
        assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[512]"
        X = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        assert X.dtype == np.float16 and np.array_equal(X, fs.features["penultimate"])  # bit for bit
        assert table.column("id").to_pylist() == fs.paths
        root = Path(cfg.data.root)  # a folder: where each image is, its file under the root
        assert table.column("path").to_pylist() == [str(root / i) for i in fs.paths]
        assert table.column("label").to_pylist() == fs.labels.tolist()
        assert table.column("class").to_pylist() == [fs.classes[i] for i in fs.labels]
        assert set(table.column("split").to_pylist()) == {r.split}
        assert pq.ParquetFile(path).metadata.num_row_groups == -(-len(fs.labels) // 4)
    assert all(step.cached for step in explain(cfg) if step.stage == "export")
    _, again = exported(cfg, row_group_rows=4)
    assert all(r.cache_hit and r.rows_written == 0 for r in again.exports)
    assert [r.paths for r in again.exports] == [r.paths for r in first.exports]
    gone = first.exports[0].paths[0]
    gone.unlink()  # an export whose file was removed is written again, in place
    _, repaired = exported(cfg, row_group_rows=4)
    assert not repaired.exports[0].cache_hit and gone.is_file()


def test_plan_lists_exports_and_says_why_one_computes(tiny_config):
    cfg = tiny_config(export={"splits": ["test"]})
    todo = [s for s in explain(cfg) if s.stage == "export"]
    assert [(s.what, s.cached) for s in todo] == [("test parquet penultimate", False)]
    assert "never computed" in " ".join(todo[0].why)
    exported(cfg, splits=["test"])
    changed = cfg.model_copy(update={"export": ExportConfig(splits=["test"], dtype="float32")})
    (step,) = [s for s in explain(changed) if s.stage == "export"]
    assert not step.cached and "dtype" in " ".join(step.why), step.why


def test_npy_is_memory_mappable_with_metadata_aligned_by_row(tiny_config):
    cfg, result = exported(tiny_config(), splits=["train"], format="npy", dtype="float32")
    (r,) = result.exports
    names = sorted(p.name for p in r.paths)
    assert names == ["train.npy", "train.parquet"]
    X = np.load(r.folder / "train.npy", mmap_mode="r")
    meta = pq.read_table(r.folder / "train.parquet")
    fs = stored(cfg, "train")
    assert X.dtype == np.float32 and np.array_equal(X, fs.features["penultimate"].astype(np.float32))
    assert meta.column_names == ["id", "path", "label", "class", "split"] and meta.column("id").to_pylist() == fs.paths


def test_a_feature_file_failing_its_checksum_is_not_exported(tiny_config):
    cfg = tiny_config()
    plan = split_plans(cfg)["train"]
    done = extract_split(plan)
    flip_a_feature_byte(done.path)
    export = plan_export(ExportConfig(), "train", plan.key, cfg.cache_dir)
    with pytest.raises(ExportRefused, match="checksum mismatch"):
        export_split(export)
    assert not export.files.folder.exists() and not list(export.files.folder.parent.glob("*tmp*"))
    assert not done.path.exists()  # quarantined: the next extraction recomputes it
    again = extract_split(plan)
    assert not again.cache_hit and export_split(export).rows == again.rows


def test_readable_by_pandas_polars_and_duckdb(tiny_config, tmp_path):
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    cfg = tiny_config()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(_yaml(cfg, tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "val.parquet"]
    train = stored(cfg, "train")
    df = pd.read_parquet(out / "train.parquet")
    assert np.array_equal(np.stack(df.embedding), train.features["penultimate"])
    frame = pl.read_parquet(out / "train.parquet")
    assert frame["embedding"].to_numpy().shape == train.features["penultimate"].shape
    counts = dict(duckdb.sql(f"select split, count(*) from '{out}/*.parquet' group by split").fetchall())
    assert counts == {s: len(stored(cfg, s).labels) for s in ("train", "val", "test")}


def test_out_that_is_a_file_fails_before_exporting_and_a_full_disk_leaves_no_temporary(tiny_config, tmp_path,
                                                                                        tiny_disk):
    from tasks.export.stage import copy_out

    cfg = tiny_config()
    taken = tmp_path / "taken.parquet"
    taken.write_bytes(b"mine")
    result = CliRunner().invoke(app, ["export", str(_yaml(cfg, tmp_path)), "--out", str(taken)])
    assert result.exit_code == 2 and "is an existing file, not a folder" in result.output, result.output
    assert not (cfg.cache_dir / "features").exists() and taken.read_bytes() == b"mine"  # nothing ran

    with local_run_settings():
        exports = pipeline_flow(cfg, stop_after="export").exports
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 4096))  # someone else's file leaves 4 KiB
    with pytest.raises(OSError, match=r"cannot copy \w+\.parquet into --out .*: No space left on device; the "
                                      r"export stays in the cache"):
        copy_out(exports, tiny_disk / "out")
    assert [p.name for p in (tiny_disk / "out").iterdir()] == []


def test_export_errors_name_the_value_and_what_is_allowed(tiny_config, tmp_path):
    cfg = tiny_config()
    path = _yaml(cfg, tmp_path)
    runner = CliRunner()
    bad_split = runner.invoke(app, ["export", str(path), "--split", "holdout"])
    assert bad_split.exit_code == 2 and "no split 'holdout'" in bad_split.output and "train, val, test" in bad_split.output
    bad_layer = runner.invoke(app, ["export", str(path), "--layer", "layer3"])
    assert bad_layer.exit_code == 2 and "'layer3' is not extracted" in bad_layer.output
    bad_format = runner.invoke(app, ["export", str(path), "--format", "csv"])
    assert bad_format.exit_code == 2 and "parquet, npy" in bad_format.output


def _yaml(cfg, folder):
    import yaml

    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    return path
