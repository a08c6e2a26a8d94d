"""Sweeps: overrides expand to validated experiments; concurrent experiments extract each feature key once."""
from __future__ import annotations

import math

import pytest
import yaml
from helpers import write_config

from flows.config import ConfigError, load_config, load_sweep

HEADS = [{"kind": "logistic", "C": [1.0]}]


def _files(tmp_path, cfg, sweep: dict, inline: bool = False):
    config = write_config(cfg, tmp_path / "base.yaml")
    if inline:
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "sweep": sweep}, sort_keys=False))
        return config, None
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return config, path


def test_a_grid_and_a_list_expand_to_named_validated_experiments(tiny_config, tmp_path):
    sweep = {
        "name": "s",
        "grid": {"heads": [[{"kind": "knn"}], [{"kind": "ridge"}]], "extract.dtype": ["float16", "float32"]},
        "experiments": [{"name": "short", "finetune.enabled": True, "finetune.epochs": 1}],
    }
    config, path = _files(tmp_path, tiny_config(heads=HEADS), sweep)
    plan, configs = load_sweep(config, path)
    assert plan.size() == 5 and plan.concurrency == 2
    names = [c.name for c in configs]
    assert names[0] == "s-short" and len(set(names)) == 5
    assert names[1] == "s-02-heads-kind_knn-dtype-float16"
    assert configs[0].finetune.enabled and configs[0].finetune.epochs == 1 and configs[0].heads[0].kind == "logistic"
    assert [(c.heads[0].kind, c.extract.dtype) for c in configs[1:]] == [
        ("knn", "float16"), ("knn", "float32"), ("ridge", "float16"), ("ridge", "float32")]
    assert all(c.data == configs[0].data and c.sweep is None for c in configs)
    # the same sweep as a section of the config; the config alone still loads as one experiment
    inline, _ = _files(tmp_path, tiny_config(heads=HEADS), sweep, inline=True)
    assert [c.name for c in load_sweep(inline)[1]] == names
    assert load_config(inline).sweep.grid == sweep["grid"]


@pytest.mark.parametrize(("sweep", "message"), [
    ({"grid": {"finetune.lr_bakbone": [0.1]}},
     r"sweep.yaml: experiment 1 \(tiny-01-lr_bakbone-0.1\): 1 problem.*finetune.lr_bakbone: unknown key \(did you mean 'lr_backbone'\?\); allowed here: "),
    ({"experiments": [{"finetune.epochs": 0}]}, r"experiment 1 .*finetune.epochs: Input should be greater than or equal to 1"),
    ({"experiments": [{"name": "a"}, {"name": "a"}]}, r"experiment 2 \(tiny-a\): duplicate experiment name"),
    ({"experiments": [{"name": "bad name"}]}, r"experiment 1 \(tiny-bad name\).*name: String should match pattern"),
    ({"grid": {"heads.kind": ["knn"]}}, r"override 'heads.kind': heads is a list, not a mapping"),
    ({"grid": {"heads": []}}, r"sweep.yaml: 1 problem\(s\) in the sweep.*grid: grid values must be non-empty lists; empty: heads"),
    ({}, r"a sweep needs a grid: mapping of dotted paths to value lists, or an experiments: list"),
    ({"grid": {"seed": [1]}, "concurency": 2}, r"concurency: unknown key \(did you mean 'concurrency'\?\); allowed here: name, grid, experiments, concurrency"),
])
def test_bad_sweeps_name_the_file_the_experiment_and_the_field(tiny_config, tmp_path, sweep, message):
    config, path = _files(tmp_path, tiny_config(heads=HEADS), sweep)
    with pytest.raises(ConfigError, match=f"(?s){message}"):
        load_sweep(config, path)


def test_a_config_without_a_sweep_says_how_to_add_one(tiny_config, tmp_path):
    config = write_config(tiny_config(heads=HEADS), tmp_path / "base.yaml")
    with pytest.raises(ConfigError, match="has no sweep: section; add one or pass --sweep"):
        load_sweep(config)


@pytest.mark.slow
def test_concurrent_experiments_extract_each_feature_key_once_and_land_in_the_registry(tiny_config, tmp_path,
                                                                                       monkeypatch):
    from flows.execution.local import local_run_settings
    from flows.experiments.sweep import run_sweep
    from storage.results import query
    from tasks.data.manifest import Manifest

    sweep = {
        "name": "cmp", "concurrency": 3,
        "experiments": [
            {"name": "logistic", "heads": [{"kind": "logistic", "C": [1.0]}]},
            {"name": "knn", "heads": [{"kind": "knn", "k": [1, 3]}]},
            {"name": "small-crop", "backbone.preprocess.crop": 24, "heads": [{"kind": "knn", "k": [1, 3]}]},
        ],
    }
    cfg = tiny_config(heads=HEADS)
    config, path = _files(tmp_path, cfg, sweep)
    plan, configs = load_sweep(config, path)
    # the first batch computed holds its key's lock a little longer, so the experiments surely overlap
    monkeypatch.setenv("TRANSFERPIPE_FAULTS", "extract.batch:1:delay=2")
    with local_run_settings():
        state = run_sweep(plan, "cmp", configs)
    assert state.is_completed()
    rows = {r["experiment"]: r for r in state.result().rows()}
    assert set(rows) == {"cmp-logistic", "cmp-knn", "cmp-small-crop"}

    manifest = Manifest.load(next((cfg.cache_dir / "manifests").glob("*.json")))
    per_key = sum(math.ceil(len(items) / 4) for items in manifest.splits.values())
    # two distinct feature keys, each batch of each extracted once: the two experiments that share a key split its
    # splits between them as their locks fell (one of them all, or each some: timing decides, not the test)
    assert rows["cmp-small-crop"]["forward batches"] == per_key
    assert rows["cmp-logistic"]["forward batches"] + rows["cmp-knn"]["forward batches"] == per_key
    registry = query(cfg.cache_dir, experiment="cmp-*")
    assert {r["experiment"] for r in registry} == {"cmp-logistic", "cmp-knn", "cmp-small-crop"}


@pytest.mark.slow
def test_a_failed_experiment_fails_the_sweep_by_name_and_the_others_finish(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    sweep = {"name": "mixed", "experiments": [
        {"name": "ok"}, {"name": "no-test", "data.test_fraction": 0.0}]}
    config, path = _files(tmp_path, tiny_config(heads=HEADS), sweep)
    result = CliRunner().invoke(app, ["run", str(config), "--sweep", str(path)])
    assert result.exit_code == 1
    assert "sweep mixed: 2 experiment(s), 2 at a time" in result.output and "mixed-ok" in result.output
    assert "failed: mixed-no-test: " in result.output and "evaluates on a test split" in result.output
