"""Heads and fine-tuning checkpoints on disk: atomic, checksummed, never unpickled; the cache layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import checkpoints, head_store as artifacts
from storage.checkpoints import CHECKPOINT_FORMAT, RunFiles, WeightsFileError
from storage.layout import CacheLayout, FeatureFiles

KEY = "a" * 64


def test_a_head_round_trips_with_its_description(tmp_path):
    arrays = {"coef_": np.arange(6, dtype=np.float32).reshape(2, 3), "intercept_": np.zeros(2, np.float32)}
    folder = artifacts.save_head(tmp_path, KEY, arrays, {"kind": "logistic", "classes": ["a", "b"]})
    assert folder == tmp_path / "heads" / KEY and artifacts.head_exists(tmp_path, KEY)
    meta, loaded = artifacts.load_head_arrays(tmp_path, KEY)
    assert meta["kind"] == "logistic" and meta["key"] == KEY and meta["format_version"] == artifacts.HEAD_FORMAT_VERSION
    assert all(np.array_equal(loaded[k], v) for k, v in arrays.items())
    assert [p.name for p in (tmp_path / "heads").iterdir()] == [KEY]  # no temporary folder left behind


def test_a_second_writer_of_the_same_key_keeps_the_first(tmp_path):
    artifacts.save_head(tmp_path, KEY, {"w": np.ones(2)}, {"n": 1})
    artifacts.save_head(tmp_path, KEY, {"w": np.ones(2)}, {"n": 2})  # same key = same content: theirs stays
    assert artifacts.read_meta(tmp_path, KEY)["n"] == 1
    assert [p.name for p in (tmp_path / "heads").iterdir()] == [KEY]


def test_a_head_with_a_wrong_format_or_key_is_refused_by_name(tmp_path):
    artifacts.save_head(tmp_path, KEY, {"w": np.ones(2)}, {})
    path = artifacts.head_dir(tmp_path, KEY) / "head.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "key": "b" * 64}))
    with pytest.raises(artifacts.CorruptArtifact, match=f"head.json: not a transferpipe head v1 for key {KEY[:12]}"):
        artifacts.read_meta(tmp_path, KEY)


def test_checkpoints_are_written_atomically_and_read_without_unpickling(tmp_path):
    files = RunFiles(CacheLayout(tmp_path).finetune_run(KEY))
    files.folder.mkdir(parents=True)
    state = {"layer.weight": torch.randn(3, 2)}
    checkpoints.save_best(files.best, state, backbone="resnet18", classes='["a"]', epoch=2, val_accuracy=0.5)
    assert not files.finished()  # result.json marks a finished run
    files.result.write_text("{}")
    assert files.finished() and not list(files.folder.glob("*.tmp"))
    saved = checkpoints.load(files.best)
    assert saved["format"] == CHECKPOINT_FORMAT and saved["epoch"] == 2
    assert torch.equal(checkpoints.load_weights_file(files.best)["layer.weight"], state["layer.weight"])
    evil = tmp_path / "evil.pt"
    torch.save({"model": Path("x")}, evil)  # loading it would need unpickling a class
    with pytest.raises(WeightsFileError, match=f"cannot load weights file {evil}"):
        checkpoints.load_weights_file(evil)


def test_the_layout_puts_every_artifact_under_the_cache_folder(tmp_path):
    layout = CacheLayout(tmp_path)
    paths = [layout.manifest("d"), layout.datasets(), layout.head(KEY), layout.finetune_run(KEY),
             layout.scores(KEY), layout.metrics(KEY), layout.selection("exp"), layout.report("exp", KEY), layout.registry(),
             layout.features.complete(KEY), layout.features.partial(KEY), layout.features.lock(KEY),
             layout.features.quarantine(), layout.features.pieces().complete(KEY)]
    assert all(p.is_relative_to(tmp_path) for p in paths) and len(set(paths)) == len(paths)
    assert layout.report("exp", KEY).name == KEY[:12]
    assert FeatureFiles.key_of(layout.features.partial(KEY)) == KEY
