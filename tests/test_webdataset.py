"""WebDataset tar shards as a dataset source: read in place, same features as the folder they came from, bad
samples named or skipped, patterns relative to the config."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from flows.config import load_config
from storage.features import FeatureStore
from helpers import make_imagefolder, make_shards, split_plans
from tasks.data.config import DataConfig
from tasks.data.errors import DataError
from tasks.data.manifest import build_manifest
from tasks.extract.stage import extract_split


def _add(tar_path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "a", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _features(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as fh:
        paths = [p.decode() if isinstance(p, bytes) else p for p in fh["paths"][:]]
        return dict(zip(paths, fh["features/penultimate"][:]))


def test_shards_give_the_same_features_as_the_folder_they_came_from(tiny_config, tmp_path):
    folder = make_imagefolder(tmp_path / "images")
    make_shards(folder, tmp_path / "shards", per_shard=5)
    data = {"val_fraction": 0, "test_fraction": 0}
    one = {"batch_size": 1}  # each source cuts its pieces (so its batches) differently: compare image by image
    from_folder = extract_split(split_plans(tiny_config(extract=one, data={**data, "root": str(folder)}))["train"])
    wds = tiny_config(extract=one, data={**data, "source": "webdataset", "root": None,
                            "shards": str(tmp_path / "shards" / "shard-{000..003}.tar")})
    from_shards = extract_split(split_plans(wds)["train"])
    a, b = _features(from_folder.path), _features(from_shards.path)
    assert len(a) == len(b) == 18
    assert list(b)[0] == "shard-000.tar/class0_000"  # <shard file>/<key>
    for item, row in a.items():
        cls, image = item.split("/")
        key = f"{cls}_{Path(image).stem}"
        shard = next(k for k in b if k.endswith("/" + key))
        np.testing.assert_array_equal(b[shard], row)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"shard-{i:03d}.tar" for i in range(4)]


def test_patterns_are_relative_to_the_config_and_can_name_each_split(tiny_config, tmp_path):
    make_shards(make_imagefolder(tmp_path / "tr"), tmp_path / "exp" / "shards", per_shard=9, name="train")
    make_shards(make_imagefolder(tmp_path / "te", n_per_class=2), tmp_path / "exp" / "shards", per_shard=9,
                name="test")
    cfg = tiny_config().model_dump(mode="json")
    cfg["data"] = {"source": "webdataset", "shards": {"train": "shards/train-{000..001}.tar",
                                                      "test": ["shards/test-000.tar"]}}
    (tmp_path / "exp" / "exp.yaml").write_text(yaml.safe_dump(cfg))
    manifest = build_manifest(load_config(tmp_path / "exp" / "exp.yaml").data, tmp_path / "cache")
    assert manifest.root == tmp_path / "exp" / "shards"
    assert {s: len(v) for s, v in manifest.splits.items()} == {"train": 18, "test": 6}
    assert manifest.classes == ["class0", "class1", "class2"]


def test_labels_from_json_fields_integers_and_classes_txt(tmp_path):
    shards = make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "s", label="json")
    cfg = DataConfig(source="webdataset", shards=[str(p) for p in shards], label_key="json.label",
                     val_fraction=0, test_fraction=0)
    assert build_manifest(cfg, tmp_path / "cache").classes == ["class0", "class1", "class2"]
    _add(shards[0], {"extra.png": (tmp_path / "images" / "class0" / "000.png").read_bytes(),
                     "extra.json": b'{"label": 1}'})
    (tmp_path / "s" / "classes.txt").write_text("class0\nclass1\nclass2\n")
    manifest = build_manifest(cfg, tmp_path / "cache")  # an integer label is a line of classes.txt
    assert ("shard-000.tar/extra", 1) in manifest.splits["train"]


def test_bad_samples_are_named_or_skipped_and_a_truncated_shard_keeps_what_came_before(tmp_path):
    shards = make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "s", per_shard=9)
    _add(shards[0], {"nolabel.png": (tmp_path / "images" / "class0" / "000.png").read_bytes(),
                     "noimage.cls": b"class1", "noimage.txt": b"hello"})
    with tarfile.open(shards[1]) as tar:
        last = tar.getmembers()[-1]
    shards[1].write_bytes(shards[1].read_bytes()[: last.offset_data + last.size // 2])  # a download cut short
    cfg = {"source": "webdataset", "shards": [str(p) for p in shards], "val_fraction": 0, "test_fraction": 0}
    with pytest.raises(DataError, match=r"3 bad sample\(s\) or shard\(s\) in data.shards: "
                                        r"shard-000.tar/nolabel: no 'cls' member for data.label_key; "
                                        r"shard-000.tar/noimage: no image member \(has cls, txt\); "
                                        r"shard-001.tar: member class2_005.cls is cut short"):
        build_manifest(DataConfig(**cfg), tmp_path / "cache")
    manifest = build_manifest(DataConfig(**cfg, on_bad_image="skip"), tmp_path / "cache")
    kept = [item for item, _ in manifest.splits["train"]]
    assert len(kept) == 17 and "shard-001.tar/class2_004" in kept and "shard-001.tar/class2_005" not in kept


@pytest.mark.parametrize("shards, message", [
    ("s3://bucket/train-{0..9}.tar", "remote shards are not supported"),
    ("train.tar.gz", "compressed tars cannot be read by sample"),
    ("missing-{0..2}.tar", r"3 of 3 shard file\(s\) do not exist"),
    ("train-{0..2.tar", "is not a valid brace pattern: Unbalanced braces"),
])
def test_shard_patterns_that_cannot_be_read_are_named(tmp_path, shards, message):
    cfg = DataConfig(source="webdataset", shards=str(tmp_path / shards) if "://" not in shards else shards)
    with pytest.raises(DataError, match=message):
        build_manifest(cfg, tmp_path / "cache")


def test_shards_belong_to_the_webdataset_source_only(tmp_path):
    with pytest.raises(ValueError, match="data.shards and data.label_key apply to source: webdataset only"):
        DataConfig(source="imagefolder", root=tmp_path, shards="x.tar")
    with pytest.raises(ValueError, match="source webdataset needs data.shards"):
        DataConfig(source="webdataset")
    with pytest.raises(ValueError, match="data.root does not apply to source webdataset"):
        DataConfig(source="webdataset", root=tmp_path, shards="x.tar")
    with pytest.raises(ValueError, match=r"takes train \(required\), val, test; got \['tain'\]"):
        DataConfig(source="webdataset", shards={"tain": "x.tar"})


def test_an_undecodable_image_in_a_shard_is_named_by_its_sample_id(tiny_config, tmp_path):
    shards = make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "s", per_shard=18)
    _add(shards[0], {"broken.png": b"\x89PNG not really", "broken.cls": b"class0"})
    data = {"source": "webdataset", "root": None, "shards": [str(p) for p in shards], "val_fraction": 0,
            "test_fraction": 0}
    with pytest.raises(DataError, match=r"shard-000.tar/broken \("):
        extract_split(split_plans(tiny_config(data=data))["train"])
    skipped = extract_split(split_plans(tiny_config(data={**data, "on_bad_image": "skip"}))["train"])
    assert skipped.rows == 18


def test_pax_and_long_names_are_read_by_tarfile_and_give_the_same_samples(tmp_path):
    """Plain ustar headers are parsed directly (fast); a shard with pax headers (long or non-ASCII names) is read
    by tarfile, with the same result."""
    folder = make_imagefolder(tmp_path / "images", n_per_class=2)
    image = (folder / "class0" / "000.png").read_bytes()
    long_key = "deep/" + "x" * 120 + "/ünïcode"
    for fmt, name in ((tarfile.USTAR_FORMAT, "ustar"), (tarfile.PAX_FORMAT, "pax")):
        with tarfile.open(tmp_path / f"{name}.tar", "w", format=fmt) as tar:
            for key, label in (("a", b"class0"), ("b", b"class1"), *((((long_key, b"class1"),) if name == "pax" else ()))):
                for member, data in ((f"{key}.png", image), (f"{key}.cls", label)):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    from tasks.data import tar_index

    assert tar_index._ustar_members(str(tmp_path / "pax.tar"), (tmp_path / "pax.tar").stat().st_size) is None
    fast, slow = tar_index.index(tmp_path / "ustar.tar"), tar_index.index(tmp_path / "pax.tar")
    assert set(fast.samples) == {"a", "b"} and set(slow.samples) == {"a", "b", long_key}
    assert fast.truncated is None and slow.truncated is None
    cfg = DataConfig(source="webdataset", shards=str(tmp_path / "pax.tar"), val_fraction=0, test_fraction=0)
    manifest = build_manifest(cfg, tmp_path / "cache")
    assert (f"pax.tar/{long_key}", 1) in manifest.splits["train"]
    assert manifest.image(f"pax.tar/{long_key}").size == (20, 20)


def test_a_new_shard_extracts_only_itself_and_plan_names_it(tiny_config, tmp_path):
    from flows.planning.explain import explain

    folder = make_imagefolder(tmp_path / "images", n_per_class=8)
    shards = make_shards(folder, tmp_path / "s", per_shard=6)  # 24 samples: 4 shards
    cfg = tiny_config(data={"source": "webdataset", "root": None, "shards": [str(p) for p in shards[:3]],
                            "val_fraction": 0, "test_fraction": 0})
    first = extract_split(split_plans(cfg)["train"])
    assert first.rows == 18 and first.forward_batches == 6  # 2 batches of 4 per shard of 6
    grown = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shards": [str(p) for p in shards]})})
    why = next(i.why for i in explain(grown) if i.stage == "extract")
    assert why[1] == "pieces: 1 of 4 to extract (6 of 24 images); 3 cached"
    assert why[2] == "  shard shard-003.tar: added"
    second = extract_split(split_plans(grown)["train"])
    assert second.rows == 24 and second.forward_batches == 2  # the new shard only


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_what_skip_leaves_out_is_in_the_feature_file_and_the_report(tiny_config, tmp_path):
    import json

    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow

    shards = make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "s", per_shard=18)
    _add(shards[0], {"broken.png": b"\x89PNG not really", "broken.cls": b"class0",  # fails to decode
                     "nolabel.png": (tmp_path / "images" / "class0" / "000.png").read_bytes()})  # fails the scan
    cfg = tiny_config(heads=[{"kind": "knn", "k": [1]}], data={
        "source": "webdataset", "root": None, "shards": [str(p) for p in shards], "on_bad_image": "skip"})
    with local_run_settings():
        result = pipeline_flow(cfg)
    manifest = json.loads(Path(split_plans(cfg)["train"].manifest).read_text())
    where = {e["path"]: split for split, entries in manifest["left_out"].items() for e in entries}
    assert list(where) == ["shard-000.tar/nolabel"]  # in the split its hash gives it
    files = {s: FeatureStore(cfg.cache_dir).read(r.key) for s, r in result.features.items()}
    skipped = {e["path"]: (s, e["error"]) for s, f in files.items() for e in f.skipped}
    assert set(skipped) == {"shard-000.tar/broken", "shard-000.tar/nolabel"}
    assert skipped["shard-000.tar/nolabel"] == (where["shard-000.tar/nolabel"], "no 'cls' member for data.label_key")
    report = Path(result.report).with_name("report.md").read_text()
    assert "## Images left out (data.on_bad_image: skip)" in report and "`shard-000.tar/nolabel`" in report
    assert "`shard-000.tar/broken` (" in report


def test_a_warm_scan_reads_no_tar_and_gc_drops_the_scans_of_changed_shards(tmp_path, monkeypatch):
    from storage import inventory
    from tasks.data import tar_index

    shards = make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "s", per_shard=9)
    cfg = DataConfig(source="webdataset", shards=[str(p) for p in shards], val_fraction=0, test_fraction=0)
    first = build_manifest(cfg, tmp_path / "cache")
    monkeypatch.setattr(tar_index, "index", lambda path: pytest.fail(f"read {path} again"))
    assert build_manifest(cfg, tmp_path / "cache").splits == first.splits  # from the remembered scans
    monkeypatch.undo()
    assert inventory.collect_scans(tmp_path / "cache") == []
    _add(shards[1], {"extra.png": (tmp_path / "images" / "class0" / "000.png").read_bytes(), "extra.cls": b"class0"})
    removed = inventory.collect_scans(tmp_path / "cache")
    assert len(removed) == 1 and "gone or changed" in removed[0][1]
    assert len(build_manifest(cfg, tmp_path / "cache").splits["train"]) == 19  # the changed shard is read again
