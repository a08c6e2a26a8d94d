"""A split's features in pieces: content-defined cuts, joins without copying, and a dataset that grows."""
from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest

from helpers import make_image, split_plans
from storage import inventory
from storage.features import CorruptFeatureFile, FeatureStore
from tasks.extract.stage import extract_pieces, extract_split
from tasks.extract.pieces import cuts
from tasks.extract.stage import join, missing


def _whole(_: str) -> None:
    return None


def test_cuts_cover_the_ids_once_and_an_insert_touches_only_its_own_piece():
    ids = sorted(f"c{i % 7}/{i:05d}.png" for i in range(3000))
    spans = cuts(ids, _whole, 64)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))
    assert 20 < len(spans) < 100  # about 3000 / 64
    before = {tuple(ids[a:b]) for a, b in spans}
    grown = sorted([*ids, "c3/00100x.png"])
    after = {tuple(grown[a:b]) for a, b in cuts(grown, _whole, 64)}
    assert len(after - before) <= 2 and len(before - after) == 1  # its piece (split in two if it is a cut)
    assert cuts(["a", "b", "c"], lambda item: item < "b", 10**9) == [(0, 1), (1, 3)]  # a group always cuts
    assert cuts(ids, lambda item: item[:2], 1) == [(i * 428 + min(i, 4), (i + 1) * 428 + min(i + 1, 4))
                                                   for i in range(7)]  # ... and only groups


def test_pieces_join_into_the_file_a_single_piece_gives(tiny_config, tmp_path):
    # batches of one image: a piece's cuts are its batches', and a batch's size can change a float's last bit
    one = split_plans(tiny_config(extract={"piece_size": 10**6, "batch_size": 1}))["train"]
    many = split_plans(tiny_config(cache_dir=str(tmp_path / "many"), extract={"piece_size": 2, "batch_size": 1}))["train"]
    assert len(one.pieces) == 1 and len(many.pieces) > 2 and one.key == many.key  # cuts are not in the key
    a, b = extract_split(one), extract_split(many)
    x, y = FeatureStore(one.cache_dir).read(one.key), FeatureStore(many.cache_dir).read(many.key)
    assert np.array_equal(x.features["penultimate"], y.features["penultimate"]) and x.paths == y.paths
    assert np.array_equal(x.labels, y.labels) and a.rows == b.rows == 12
    with h5py.File(a.path) as f1, h5py.File(b.path) as f2:
        assert f1.attrs["checksums"] == f2.attrs["checksums"]  # the same rows, so the same digests
        assert len(f2["features/penultimate"].virtual_sources()) == len(many.pieces)
    store = FeatureStore(many.cache_dir)
    assert store.verify(many.key) == []
    # nothing is copied: the joined file is metadata, labels and paths
    assert b.path.stat().st_size < sum(p.stat().st_size for p in store.pieces().root.glob("*.h5"))
    assert extract_split(many).cache_hit


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_a_folder_that_grows_extracts_only_the_pieces_with_new_images(tiny_config, tmp_path):
    cfg = tiny_config(extract={"piece_size": 3}, data={"val_fraction": 0, "test_fraction": 0})
    before = split_plans(cfg)["train"]
    first = extract_split(before)
    make_image(cfg.data.root / "class1" / "005b.png", 1, 77)  # one new image, and one changed
    make_image(cfg.data.root / "class2" / "001.png", 2, 88)
    after = split_plans(cfg)["train"]
    todo = missing(after)
    assert after.key != before.key and 1 <= len(todo) <= 4 and len(todo) < len(after.pieces)
    grown = extract_split(after)
    assert grown.rows == first.rows + 1 and grown.forward_batches == len(todo)  # one batch each (size 4)
    # the same features as extracting the grown folder from scratch
    fresh_cfg = tiny_config(cache_dir=str(tmp_path / "fresh"), extract={"piece_size": 3},
                            data={"val_fraction": 0, "test_fraction": 0})
    fresh = split_plans(fresh_cfg)["train"]
    extract_split(fresh)
    x, y = FeatureStore(cfg.cache_dir).read(after.key), FeatureStore(fresh_cfg.cache_dir).read(fresh.key)
    assert np.array_equal(x.features["penultimate"], y.features["penultimate"]) and x.paths == y.paths
    assert np.array_equal(x.labels, y.labels)


def test_images_appended_after_the_last_piece_extract_alone(tiny_config, tmp_path):
    """Issue 44.7: the split's open last piece grows when images land after it; its old rows are copied (their key,
    recomputed, proves them unchanged) and only the new images go through the backbone: the same bytes as a
    cold extraction of the grown folder. A changed old image is extracted again instead."""
    over = {"extract": {"piece_size": 10**6, "batch_size": 4}, "data": {"val_fraction": 0, "test_fraction": 0}}
    cfg = tiny_config(**over)
    before = split_plans(cfg)["train"]
    assert len(before.pieces) == 1 and extract_split(before).forward_batches == 5  # 18 images in batches of 4
    for i in (6, 7):
        make_image(cfg.data.root / "class2" / f"{i:03d}.png", 2, 50 + i)  # sorted after every image there
    after = split_plans(cfg)["train"]
    assert after.pieces[0].key != before.pieces[0].key
    grown = extract_split(after)
    assert grown.rows == 20 and grown.forward_batches == 1  # the two new images only
    with h5py.File(FeatureStore(cfg.cache_dir).pieces().path(after.pieces[0].key)) as fh:
        assert fh.attrs["rows_copied"] == 18
    fresh_cfg = tiny_config(cache_dir=str(tmp_path / "fresh"), **over)
    fresh = split_plans(fresh_cfg)["train"]
    extract_split(fresh)
    x, y = FeatureStore(cfg.cache_dir).read(after.key), FeatureStore(fresh_cfg.cache_dir).read(fresh.key)
    assert np.array_equal(x.features["penultimate"], y.features["penultimate"]) and x.paths == y.paths
    assert np.array_equal(x.labels, y.labels)
    make_image(cfg.data.root / "class0" / "000.png", 0, 99)  # an old image changed: no copy of stale rows
    make_image(cfg.data.root / "class2" / "008.png", 2, 58)
    changed = split_plans(cfg)["train"]
    assert extract_split(changed).forward_batches == 6  # 21 images, all extracted
    store = FeatureStore(cfg.cache_dir)
    tails = sorted(store.pieces().root.glob("*.tail.json"))
    assert len(tails) == 2  # the first image's two identities: before and after it changed
    for key in (before.key, after.key):  # the split files that joined the old pieces, gone
        store.remove(key)
    old = time.time() - 2 * 3600
    for path in store.pieces().root.glob("*.h5"):
        os.utime(path, (old, old))
    removed = {p for p, _ in inventory.collect(store, partial_older_than_s=3600)}
    assert tails[0] in removed or tails[1] in removed  # the record of a removed piece goes with it
    assert [t for t in tails if t.exists()] == [t for t in tails if t not in removed] != []


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_a_new_class_renumbers_labels_without_recomputing_features(tiny_config):
    cfg = tiny_config(extract={"piece_size": 4}, data={"val_fraction": 0, "test_fraction": 0})
    old = split_plans(cfg)["train"]
    extract_split(old)
    for i in range(2):  # "aaa" sorts first: every old label moves up by one
        make_image(cfg.data.root / "aaa" / f"{i}.png", 3, i)
    new = split_plans(cfg)["train"]
    result = extract_split(new)
    assert result.forward_batches <= 2  # the pieces with the new class only
    got = FeatureStore(cfg.cache_dir).read(new.key)
    assert got.classes[0] == "aaa"
    assert all(got.classes[y] == p.split("/")[0] for p, y in zip(got.paths, got.labels))


def test_a_missing_piece_is_never_read_as_zeros(tiny_config):
    plan = split_plans(tiny_config(extract={"piece_size": 2}))["train"]
    extract_split(plan)
    store = FeatureStore(plan.cache_dir)
    store.pieces().path(plan.pieces[1].key).unlink()
    assert store.lookup(plan.key) is None  # quarantined: "piece file(s) ... are missing"
    assert list((store.root / "quarantine").glob(f"{plan.key}.h5.corrupt-*"))
    result = extract_split(plan)  # a plain rerun recomputes that piece only
    assert not result.cache_hit and result.forward_batches == 1 and store.verify(plan.key) == []


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_a_corrupt_piece_fails_the_join_by_name_and_is_recomputed_on_rerun(tiny_config):
    plan = split_plans(tiny_config(extract={"piece_size": 2}))["train"]
    extract_pieces(plan)
    bad = FeatureStore(plan.cache_dir).pieces().path(plan.pieces[0].key)
    with h5py.File(bad, "r+") as fh:
        fh["features/penultimate"][0, 0] += 1
    with pytest.raises(CorruptFeatureFile, match=f"piece\\(s\\) {bad} .* failed their checksums and were quarantined"):
        join(plan)
    assert not bad.exists() and not FeatureStore(plan.cache_dir).partial_path(plan.key).exists()
    result = extract_split(plan)
    assert result.forward_batches == 1 and FeatureStore(plan.cache_dir).verify(plan.key) == []


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_gc_removes_stale_partial_pieces_and_pieces_no_file_joins(tiny_config, monkeypatch):
    from storage.faults import ENV, InjectedFault

    plans = split_plans(tiny_config(extract={"piece_size": 4}))
    train, val = plans["train"], plans["val"]
    extract_split(val)
    monkeypatch.setenv(ENV, "extract.batch:2:raise")  # the train split stops after one flushed batch
    with pytest.raises(InjectedFault):
        extract_split(train)
    monkeypatch.delenv(ENV)
    store, pieces = FeatureStore(train.cache_dir), FeatureStore(train.cache_dir).pieces()
    partial = [p for p in pieces.root.glob("*.partial")]
    done = [p for p in pieces.root.glob("*.h5") if p.stem not in {q.key for q in val.pieces}]
    assert len(partial) == 1 and done
    assert inventory.collect(store, partial_older_than_s=3600) == []  # fresh: kept
    old = time.time() - 2 * 3600
    for path in [*partial, *done, *pieces.root.glob("*.h5")]:
        os.utime(path, (old, old))
    removed = {p for p, _ in inventory.collect(store, partial_older_than_s=3600) if not p.name.endswith(".tail.json")}
    assert removed == {*partial, *done}  # the train split's pieces: no file joins them yet
    assert all(pieces.lookup(p.key) is not None for p in val.pieces)  # val's file joins these
    store.remove(val.key)
    removed = {p for p, _ in inventory.collect(store, partial_older_than_s=3600)}
    assert {p for p in removed if p.suffix == ".h5"} == {pieces.path(p.key) for p in val.pieces}
    assert {p for p in removed if p.suffix == ".json"} and not list(pieces.root.glob("*.tail.json"))  # theirs too


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_a_join_of_more_pieces_than_open_files_allowed(tiny_config, tmp_path):
    """A 1.28M-image split is ~1,250 pieces: joining keeps one piece open at a time (``ulimit -n`` is often 1024;
    here 40 files for 60 pieces)."""
    import resource

    from helpers import make_imagefolder

    root = make_imagefolder(tmp_path / "many", n_per_class=20)
    plan = split_plans(tiny_config(data={"root": str(root), "val_fraction": 0, "test_fraction": 0},
                                   extract={"piece_size": 1}))["train"]
    extract_pieces(plan)
    assert len(plan.pieces) == 60
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, hard))
    try:
        path = join(plan)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert FeatureStore(plan.cache_dir).verify(plan.key) == [] and path.exists()
