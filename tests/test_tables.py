"""Tables of images as a dataset source (Parquet bytes, the Hugging Face layout, CSV and JSON Lines lists of
paths): the same features as the folder they describe, bad rows named or skipped, the column in the key."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from flows.config import load_config
from helpers import make_imagefolder, make_shards, make_table, split_plans
from tasks.data.config import DataConfig
from tasks.data.errors import DataError
from tasks.data.manifest import build_manifest
from tasks.extract.stage import extract_split

ALL_TRAIN = {"val_fraction": 0, "test_fraction": 0}


def _by_image(path: Path, to_image) -> dict[str, np.ndarray]:
    """A feature file's rows keyed by the image file each id stands for."""
    with h5py.File(path, "r") as fh:
        ids = [p.decode() if isinstance(p, bytes) else p for p in fh["paths"][:]]
        return {to_image(i): row for i, row in zip(ids, fh["features/penultimate"][:])}


def test_a_folder_a_csv_list_shards_and_a_parquet_table_give_identical_features(tiny_config, tmp_path):
    folder = make_imagefolder(tmp_path / "images")
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    make_shards(folder, tmp_path / "shards", per_shard=17)  # batches of 16 + 1 and 1, the folder's 16 + 2
    table = make_table(folder, tmp_path / "t" / "images.parquet", holds="struct", row_group=4)
    make_table(folder, folder / "list.csv", holds="path")

    def extract(**data):
        # each source cuts its pieces (so its batches) differently: every image must still get the same bits
        batches = {"batch_size": 16, "dtype": "float32"}
        return extract_split(split_plans(tiny_config(extract=batches, data={**ALL_TRAIN, "root": None, **data}))["train"]).path

    runs = {
        "folder": _by_image(extract(source="imagefolder", root=str(folder)), lambda i: i),
        "csv": _by_image(extract(source="table", path=str(folder / "list.csv"), image="image"), lambda i: i),
        "webdataset": _by_image(extract(source="webdataset", shards=str(tmp_path / "shards" / "shard-{000..001}.tar")),
                                lambda i: i.split("/")[1].replace("_", "/", 1) + ".png"),
        "parquet": _by_image(extract(source="table", path=str(table)), lambda i: images[int(i.split("#")[1])]),
    }
    assert all(sorted(found) == images for found in runs.values())
    for name, found in runs.items():
        for image in images:
            np.testing.assert_array_equal(found[image], runs["folder"][image], err_msg=f"{name}: {image}")


def test_a_hugging_face_struct_without_bytes_reads_its_path_relative_to_the_table(tiny_config, tmp_path):
    """``Dataset.from_dict({"image": paths}).cast_column("image", Image()).to_parquet(...)`` writes
    ``{bytes: null, path}``; ``datasets`` decodes those rows from the path, so does the table source."""
    folder = make_imagefolder(tmp_path / "images")
    images = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    table = make_table(folder, tmp_path / "hf" / "images.parquet", holds="struct-paths")

    def extract(**data):
        return extract_split(split_plans(tiny_config(data={**ALL_TRAIN, "root": None, **data}))["train"]).path

    by_path = _by_image(extract(source="table", path=str(table)), lambda i: images[int(i.split("#")[1])])
    folder_features = _by_image(extract(source="imagefolder", root=str(folder)), lambda i: i)
    assert sorted(by_path) == images
    for image in images:
        np.testing.assert_array_equal(by_path[image], folder_features[image], err_msg=image)

    cfg = DataConfig(source="table", path=str(table), **ALL_TRAIN)
    before = build_manifest(cfg, tmp_path / "cache").fingerprints
    (folder / images[3]).write_bytes((folder / images[4]).read_bytes())  # the table is unchanged, an image is not
    assert build_manifest(cfg, tmp_path / "cache").fingerprints != before
    (folder / images[3]).unlink()
    manifest = build_manifest(cfg, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"images.parquet row 3: its image bytes are null and its path "
                                                r"'\.\./images/.*' cannot be read .*relative path is read from the "
                                                r"table's folder"):
        manifest.image("images.parquet#000000003")


def test_parquet_ids_class_labels_and_a_split_column(tmp_path):
    folder = make_imagefolder(tmp_path / "images")
    table = make_table(folder, tmp_path / "hf.parquet", holds="bytes", split=True, class_label=True)
    manifest = build_manifest(DataConfig(source="table", path=str(table), split="split"), tmp_path / "cache")
    assert manifest.classes == ["class0", "class1", "class2"]  # from the schema's ClassLabel
    assert {s: len(v) for s, v in manifest.splits.items()} == {"train": 10, "val": 4, "test": 4}
    assert manifest.splits["train"][0] == ("hf.parquet#000000000", 0)  # <table file>#<row>, in row order
    assert manifest.image("hf.parquet#000000017").size == (20, 20)


def test_an_id_never_repeats_and_where_the_image_is_travels_beside_it(tmp_path):
    """Two Hugging Face tables whose struct paths repeat (the same images in both): ids stay ``<file>#<row>``
    (unique), and :meth:`locations` (predictions' ``path`` column) gives each row's struct path; rows with bytes
    and no struct name their table row; rows of a path list, shards and folders name their file or member."""
    from tasks.data.config import get

    folder = make_imagefolder(tmp_path / "images")
    for name in ("a", "b"):
        make_table(folder, tmp_path / "hf" / f"{name}.parquet", holds="struct")
    hf = build_manifest(DataConfig(source="table", path=str(tmp_path / "hf" / "*.parquet"), **ALL_TRAIN),
                        tmp_path / "cache")
    ids = [i for i, _ in hf.splits["train"]]
    where = get("table").locations(hf.root, ids, hf.options)
    assert len(set(ids)) == 36 and ids[0] == "a.parquet#000000000"
    assert where[0] == where[18] == "class0/000.png" and len(set(where)) == 18  # the struct's path, as the table holds it
    raw = build_manifest(DataConfig(source="table", path=str(make_table(folder, tmp_path / "raw.parquet", holds="bytes")),
                                    **ALL_TRAIN), tmp_path / "cache")
    assert get("table").locations(raw.root, ["raw.parquet#000000003"], raw.options) == [f"{tmp_path}/raw.parquet#3"]
    listed = build_manifest(DataConfig(source="table", path=str(make_table(folder, tmp_path / "l.csv", holds="path")),
                                       root=str(folder), **ALL_TRAIN), tmp_path / "cache")
    assert get("table").locations(listed.root, ["class1/002.png"], listed.options) == [str(folder / "class1" / "002.png")]
    make_shards(folder, tmp_path / "shards")
    wds = build_manifest(DataConfig(source="webdataset", shards=str(tmp_path / "shards" / "shard-{000..002}.tar"), **ALL_TRAIN),
                         tmp_path / "cache")
    first = wds.splits["train"][0][0]
    shard, _, key = first.partition(".tar/")
    assert get("webdataset").locations(wds.root, [first], wds.options) == [f"{wds.root / shard}.tar#{key}"]
    assert get("imagefolder").locations(folder, ["class0/000.png"], {}) == [str(folder / "class0" / "000.png")]


def test_json_lines_with_paths_relative_to_root_and_a_glob_of_tables(tmp_path):
    folder = make_imagefolder(tmp_path / "images")
    make_table(folder, tmp_path / "lists" / "a.jsonl", holds="path")
    cfg = {"source": "table", "path": "lists/*.jsonl", "root": "images", **ALL_TRAIN}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "t", "data": cfg}))
    manifest = build_manifest(load_config(tmp_path / "exp.yaml").data, tmp_path / "cache")
    assert manifest.root == tmp_path / "images" and len(manifest.splits["train"]) == 18
    for n, half in enumerate(("first", "second")):
        make_table(folder, tmp_path / "parts" / f"{n}-{half}.parquet", holds="struct")
    globbed = build_manifest(DataConfig(source="table", path=str(tmp_path / "parts" / "*.parquet"), **ALL_TRAIN),
                             tmp_path / "cache")
    assert len(globbed.splits["train"]) == 36 and globbed.splits["train"][-1][0] == "1-second.parquet#000000017"


def test_bad_rows_are_named_or_skipped(tmp_path):
    folder = make_imagefolder(tmp_path / "images")
    csv = make_table(folder, folder / "list.csv", holds="path")
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines, '"class0/gone.png","class0"', '"class1/000.png",""']) + "\n")
    cfg = {"source": "table", "path": str(csv), **ALL_TRAIN}
    with pytest.raises(DataError, match=r"2 bad row\(s\) in .*list.csv: list.csv#19: no label; class0/gone.png "
                                        r"\(row of .*list.csv\): no such file under"):
        build_manifest(DataConfig(**cfg), tmp_path / "cache")
    assert len(build_manifest(DataConfig(**cfg, on_bad_image="skip"), tmp_path / "cache").splits["train"]) == 18


def test_rows_naming_files_outside_the_root_are_read_or_with_inside_root_named(tmp_path):
    """A CSV may name any file the user can read (``../x``, absolute paths): that is the default, documented;
    ``data.paths: inside_root`` leaves those rows out (or fails on them), links resolved."""
    folder = make_imagefolder(tmp_path / "images")
    secret = tmp_path / "secret.png"
    secret.write_bytes((folder / "class0" / "000.png").read_bytes())
    csv = make_table(folder, folder / "list.csv", holds="path")
    os.symlink(secret, folder / "class1" / "link.png")
    csv.write_text(csv.read_text() + f'"../secret.png","class0"\n"{secret}","class1"\n"class1/link.png","class1"\n')
    cfg = {"source": "table", "path": str(csv), **ALL_TRAIN}
    assert len(build_manifest(DataConfig(**cfg), tmp_path / "cache").splits["train"]) == 21
    with pytest.raises(DataError, match=r"3 bad row\(s\) in .*list.csv: .*secret.png \(row of .*\): outside data.root "
                                        r".*images \(data.paths: inside_root\)"):
        build_manifest(DataConfig(**cfg, paths="inside_root"), tmp_path / "cache")
    kept = build_manifest(DataConfig(**cfg, paths="inside_root", on_bad_image="skip"), tmp_path / "cache")
    assert len(kept.splits["train"]) == 18


def test_float_labels_are_refused_not_turned_into_class_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = make_table(make_imagefolder(tmp_path / "images"), tmp_path / "t.parquet", class_label=True)
    floats = pq.read_table(table)
    floats = floats.set_column(1, "label", pa.array([float(v) for v in floats["label"].to_pylist()]))
    pq.write_table(floats, table)
    with pytest.raises(DataError, match=r"t.parquet: column 'label' \(data.label\) holds floating-point numbers "
                                        r"\(double, e.g. 0.0\); class labels are integers or names"):
        build_manifest(DataConfig(source="table", path=str(table), **ALL_TRAIN), tmp_path / "cache")


@pytest.mark.parametrize("over, message", [
    ({"image": "pixels"}, r"no column 'pixels' for data.image; columns: image, label"),
    ({"image": "label"}, r"column 'label' is int64; data.image must hold image bytes"),
    ({"label": "cls"}, r"no column\(s\) \['cls'\]"),
    ({"split": "label"}, r"row 0: split 0 is not one of train, val \(validation\), test"),
    ({"path": "nothing-*.parquet"}, "names no readable table file"),
])
def test_columns_and_files_that_do_not_fit_are_named(tmp_path, over, message):
    table = make_table(make_imagefolder(tmp_path / "images"), tmp_path / "t.parquet", class_label=True)
    cfg = {"source": "table", "path": str(table), **over}
    if "path" in over:
        cfg["path"] = str(tmp_path / over["path"])
    with pytest.raises(DataError, match=message):
        build_manifest(DataConfig(**cfg), tmp_path / "cache")


def test_the_image_column_is_in_the_key(tmp_path):
    import pyarrow.parquet as pq

    table = make_table(make_imagefolder(tmp_path / "images"), tmp_path / "t.parquet", holds="bytes")
    data = pq.read_table(table)
    pq.write_table(data.append_column("flipped", data.column("image")), table)
    first = build_manifest(DataConfig(source="table", path=str(table)), tmp_path / "cache")
    other = build_manifest(DataConfig(source="table", path=str(table), image="flipped"), tmp_path / "cache")
    assert first.splits == other.splits and first.fingerprints != other.fingerprints


def test_table_fields_belong_to_the_table_source_only(tmp_path):
    with pytest.raises(ValueError, match="data.path, data.image, data.label and data.split apply to source: table"):
        DataConfig(source="imagefolder", root=tmp_path, image="img")
    with pytest.raises(ValueError, match="source table needs data.path"):
        DataConfig(source="table")


def test_threads_reading_one_row_group_read_it_once(tmp_path, monkeypatch):
    """The header check's thread pool read a 360 MB row group once per thread at the same time (7.2 GB RSS)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from tasks.data import arrow as tables

    table = make_table(make_imagefolder(tmp_path / "images"), tmp_path / "t.parquet", holds="bytes", row_group=18)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: reads.append(a) or real(self, *a, **k))
    tables._group_images.cache_clear()
    column = tables.image_column(str(table), "image")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda row: tables.image_bytes(str(table), row, column), range(18)))
    assert len(reads) == 1 and all(got)
