from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks.data.errors import BadImageError
from tasks.data.config import DataConfig
from tasks.data.errors import DataError
from tasks.data.manifest import build_manifest, split_by_fraction
from tasks.data.images import load_rgb, to_rgb
from helpers import make_image, make_imagefolder


def manifest(tmp_path, **cfg):
    return build_manifest(DataConfig(**cfg), tmp_path / "cache")


def test_imagefolder_with_split_folders(tmp_path):
    root = make_imagefolder(tmp_path / "ds", n_per_class=2, classes=3, splits=("train", "val", "test"))
    m = manifest(tmp_path, source="imagefolder", root=root)
    assert m.classes == ["class0", "class1", "class2"]
    assert sorted(m.splits) == ["test", "train", "val"]
    assert m.splits["train"][0] == ("train/class0/000.png", 0)
    assert {y for _, y in m.splits["val"]} == {0, 1, 2}
    assert len(set(m.fingerprints.values())) == 3


def test_imagefolder_without_split_folders_is_split_by_each_images_hash_and_seeded(tmp_path):
    root = make_imagefolder(tmp_path / "ds", n_per_class=10, classes=3)
    m1 = manifest(tmp_path, source="imagefolder", root=root, val_fraction=0.2, test_fraction=0.3, seed=1)
    m2 = manifest(tmp_path, source="imagefolder", root=root, val_fraction=0.2, test_fraction=0.3, seed=1)
    m3 = manifest(tmp_path, source="imagefolder", root=root, val_fraction=0.2, test_fraction=0.3, seed=2)
    assert m1.splits == m2.splits and m1.splits != m3.splits
    for split in ("train", "val", "test"):
        assert {y for _, y in m1.splits[split]} == {0, 1, 2}
    everything = sorted(p for items in m1.splits.values() for p, _ in items)
    assert len(everything) == len(set(everything)) == 30


def test_fractions_hold_on_large_data_and_growth_never_moves_an_image():
    items = [(f"c{i % 10}/{i:06d}.png", i % 10) for i in range(20000)]
    out = split_by_fraction(items, 0.1, 0.2, seed=0)
    assert abs(len(out["test"]) / 20000 - 0.2) < 0.01 and abs(len(out["val"]) / 20000 - 0.1) < 0.01
    grown = split_by_fraction(items + [(f"c{i % 10}/new{i:05d}.png", i % 10) for i in range(200)], 0.1, 0.2, seed=0)
    for split, members in out.items():  # every old image stays where it was; only new ones are added
        assert [m for m in grown[split] if "/new" not in m[0]] == members


def test_fraction_zero_means_no_such_split(tmp_path):
    root = make_imagefolder(tmp_path / "ds", n_per_class=4, classes=2)
    m = manifest(tmp_path, source="imagefolder", root=root, val_fraction=0, test_fraction=0.25)
    assert sorted(m.splits) == ["test", "train"]


def test_split_keeps_one_training_image_per_class():
    out = split_by_fraction([("a.png", 0), ("b.png", 1), ("c.png", 1)], 0.4, 0.5, seed=0)
    assert {y for _, y in out["train"]} == {0, 1}


def test_csv_with_and_without_split_column(tmp_path):
    root = make_imagefolder(tmp_path / "ds", n_per_class=3, classes=2)
    rows = [f"class{c}/{i:03d}.png,{'cat' if c else 'dog'},{'train' if i < 2 else 'test'}" for c in range(2) for i in range(3)]
    (root / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    m = manifest(tmp_path, source="csv", root=root / "labels.csv")
    assert m.classes == ["cat", "dog"]
    assert len(m.splits["train"]) == 4 and len(m.splits["test"]) == 2
    assert ("class0/000.png", 1) in m.splits["train"]
    (root / "nosplit.csv").write_text("path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    m = manifest(tmp_path, source="csv", root=root / "nosplit.csv", val_fraction=0, test_fraction=0.34)
    assert sorted(m.splits) == ["test", "train"]


@pytest.mark.parametrize(
    ("csv_text", "expected"),
    [
        ("file,label\na.png,x\n", "header must have columns path,label"),
        ("path,label,split\nclass0/000.png,a,train\nclass1/000.png,b,holdout\n", "labels.csv row 1: split 'holdout' is not one of train, val"),
        ("path,label\nclass0/000.png,a\nmissing.png,b\n", "labels.csv: missing.png (row of"),
        ("path,label\nclass0/000.png,a\nclass0/001.png,a\n", "labels.csv: found 1 class(es) ['a']; a classifier needs at least 2"),
    ],
)
def test_csv_errors(tmp_path, csv_text, expected):
    root = make_imagefolder(tmp_path / "ds", n_per_class=2, classes=2)
    (root / "labels.csv").write_text(csv_text)
    with pytest.raises(DataError) as exc:
        manifest(tmp_path, source="csv", root=root / "labels.csv")
    assert expected in str(exc.value)


def test_digits_are_written_once_and_deterministic(tmp_path):
    m1 = manifest(tmp_path, source="digits")
    m2 = manifest(tmp_path, source="digits")
    assert m1.classes == [str(d) for d in range(10)]
    assert sum(len(v) for v in m1.splits.values()) == 1797
    assert m1.fingerprints == m2.fingerprints
    img = load_rgb(m1.root / m1.splits["train"][0][0])
    assert img.mode == "RGB" and img.size == (8, 8)


def test_unusable_datasets_fail_before_compute(tmp_path):
    with pytest.raises(DataError, match="is not a readable folder"):
        manifest(tmp_path, source="imagefolder", root=tmp_path / "missing")
    one = make_imagefolder(tmp_path / "one", classes=1)
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) \['class0'\]; a classifier needs at least 2"):
        manifest(tmp_path, source="imagefolder", root=one)
    empty = make_imagefolder(tmp_path / "empty", classes=2)
    (empty / "class9").mkdir()
    (empty / "class9" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="class folder .*class9 has no images"):
        manifest(tmp_path, source="imagefolder", root=empty)
    splits = make_imagefolder(tmp_path / "splits", classes=2, splits=("train",))
    (splits / "val" / "class0").mkdir(parents=True)
    with pytest.raises(DataError, match="split folder .*val has no images"):
        manifest(tmp_path, source="imagefolder", root=splits)
    few = make_imagefolder(tmp_path / "few", n_per_class=2, classes=2)
    with pytest.raises(DataError, match=r"data.(val_fraction=0.1|test_fraction=0.5) gives no (val|test) images"):
        manifest(tmp_path, source="imagefolder", root=few, val_fraction=0.1, test_fraction=0.5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    path = make_image(tmp_path / "x" / "img.png", 0, 0, mode="RGB")
    img = Image.open(path)
    if mode == "I;16":
        img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(np.full((4, 4), 1.0, dtype=np.float32), mode="F")
    else:
        img = img.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB"
    if mode in ("I;16", "F"):
        assert np.asarray(out).min() == 255  # full scale stays full scale, not clipped garbage


def test_16bit_png_round_trip_and_palette_with_transparency(tmp_path):
    arr = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    out = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert np.asarray(load_rgb(tmp_path / "pal.png"))[0, 0].tolist() == [200, 10, 10]


def test_bad_image_error_lists_paths():
    err = BadImageError([{"path": "a.png", "error": "truncated"}, {"path": "b.png", "error": "empty"}], "train")
    assert "2 image(s) in train cannot be decoded: a.png (truncated); b.png (empty)" in str(err)
    assert "on_bad_image: skip" in str(err)


def test_digits_halves_are_disjoint_balanced_and_the_second_scanner_looks_different(tmp_path):
    from tasks.data.config import DigitsConfig

    first = manifest(tmp_path, source="digits", digits=DigitsConfig(half="first", style="clean"))
    second = manifest(tmp_path, source="digits", digits=DigitsConfig(half="second", style="scanner2"))
    names = lambda m: {p.rsplit("/", 1)[1] for items in m.splits.values() for p, _ in items}  # noqa: E731
    assert names(first).isdisjoint(names(second)) and len(names(first)) + len(names(second)) == 1797
    counts = np.bincount([y for items in first.splits.values() for _, y in items])
    assert counts.max() - counts.min() <= 10  # each class split in two
    clean = np.asarray(load_rgb(first.root / first.splits["train"][0][0]), dtype=np.float64)
    scanned = np.asarray(load_rgb(second.root / second.splits["train"][0][0]), dtype=np.float64)
    assert clean.shape == scanned.shape == (32, 32, 3)
    assert np.allclose(clean[..., 0], clean[..., 2])  # grey
    assert scanned[..., 0].mean() > scanned[..., 2].mean() + 10  # amber ink on blue-grey paper: tinted
    again = manifest(tmp_path, source="digits", digits=DigitsConfig(half="second", style="scanner2"))
    assert again.fingerprints == second.fingerprints  # written once, deterministic
    with pytest.raises(ValueError, match="data.digits applies to source: digits only"):
        DataConfig(source="imagefolder", root=tmp_path, digits=DigitsConfig(half="first"))


def test_digits_class_subset(tmp_path):
    from tasks.data.config import DigitsConfig

    m = manifest(tmp_path, source="digits", digits=DigitsConfig(half="first", classes=[4, 0, 2]))
    assert m.classes == ["0", "2", "4"]
    with pytest.raises(ValueError, match="classes must be two or more distinct digits 0-9"):
        DigitsConfig(classes=[3])
