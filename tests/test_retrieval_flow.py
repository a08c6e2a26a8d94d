"""Retrieval, the embedding map and the FAISS index inside real flow runs: report, registry, cache, plan."""
from __future__ import annotations

import json

import pytest

from flows.planning.explain import explain
from flows.execution.local import local_run_settings
from flows.pipeline import pipeline_flow
from storage.features import FeatureStore
from storage.results import query
from tasks.index.retrieval import Rows, retrieval_metrics
from helpers import split_plans

pytestmark = pytest.mark.slow

HEADS = [{"kind": "logistic", "C": [1.0]}]


def run(cfg, goal="evaluate"):
    with local_run_settings():
        return pipeline_flow(cfg, stop_after=goal)


def test_retrieval_in_report_registry_and_a_head_change_does_not_search_again(tiny_config):
    cfg = tiny_config(heads=HEADS, evaluate={"retrieval": {"k": [1, 3]}})
    first = run(cfg)
    found = first.evaluation.retrieval
    plans = split_plans(cfg)
    store = FeatureStore(cfg.cache_dir)
    test, train = (store.read(plans[s].key) for s in ("test", "train"))
    want = retrieval_metrics(Rows.of(test.features["penultimate"], test.labels),
                             Rows.of(train.features["penultimate"], train.labels), [1, 3])
    assert {k: found[k] for k in ("map_at_r", "recall_at_1", "precision_at_3")} == \
        {k: want[k] for k in ("map_at_r", "recall_at_1", "precision_at_3")}
    report = json.loads(first.report.with_name("report.json").read_text())
    assert report["retrieval"]["map_at_r"] == found["map_at_r"]
    text = first.report.read_text()
    assert "## Retrieval" in text and "mAP@R" in text and "Recall@3" in text
    assert "![embedding_map](embedding_map.png)" in text and first.report.with_name("embedding_map.png").stat().st_size
    (row,) = [r for r in query(cfg.cache_dir, cfg.name, "map_at_r") if r["model"] == "retrieval"]
    assert row["map_at_r"] == found["map_at_r"] and row["top1"] == found["precision_at_1"]
    assert row["kind"] == "retrieval:cosine" and row["n_test"] == found["queries"]
    (drawn,) = (cfg.cache_dir / "maps").glob("*.png")
    drawn_at = drawn.stat().st_mtime_ns
    changed = cfg.model_copy(update={"heads": [cfg.heads[0].model_copy(update={"C": [0.5]})]})
    again = run(changed)
    assert again.evaluation.retrieval["seconds"] == found["seconds"]  # remembered, not searched again
    assert list((cfg.cache_dir / "maps").glob("*.png")) == [drawn] and drawn.stat().st_mtime_ns == drawn_at
    assert again.report.with_name("embedding_map.png").read_bytes() == drawn.read_bytes()  # drawn once, copied
    off = changed.model_copy(update={"evaluate": changed.evaluate.model_copy(update={"retrieval": None})})
    assert [s for s in explain(off) if s.stage == "evaluate" and not s.cached], "the settings are in the key"


def test_leave_one_out_and_bad_settings_fail_before_anything_computes(tiny_config):
    cfg = tiny_config(heads=HEADS, evaluate={"retrieval": {"gallery": "test", "metric": "l2"}})
    found = run(cfg).evaluation.retrieval
    assert found["leave_one_out"] and found["metric"] == "l2"
    bad = tiny_config(heads=HEADS, evaluate={"retrieval": {"layer": "layer3"}}, cache_dir=str(cfg.cache_dir) + "-bad")
    with pytest.raises(Exception, match="evaluate.retrieval.layer: 'layer3' is not extracted"):
        run(bad)
    assert not (bad.cache_dir / "features").exists() or not list((bad.cache_dir / "features").glob("*.h5"))


def test_index_is_built_measured_cached_and_used_by_retrieval(tiny_config):
    pytest.importorskip("faiss")
    cfg = tiny_config(heads=HEADS, index={"kind": "hnsw"})
    assert [(s.what, s.cached) for s in explain(cfg) if s.stage == "index"] == [("train hnsw cosine", False)]
    built = run(cfg, "index").index
    assert built.kind == "hnsw" and built.rows == len(FeatureStore(cfg.cache_dir).paths(split_plans(cfg)["train"].key))
    assert built.recall_at_k == 1.0 and built.queries > 0 and built.index_bytes > 0 and built.path.is_file()
    assert [s.cached for s in explain(cfg) if s.stage == "index"] == [True]
    again = run(cfg, "index").index
    assert again.cache_hit and again.path == built.path
    faiss_cfg = tiny_config(heads=HEADS, evaluate={"retrieval": {"index": "faiss"}})
    via_index = run(faiss_cfg).evaluation.retrieval
    assert via_index["index"] == "faiss" and via_index["index_recall"] == 1.0  # a small split: flat, exact
    direct = tiny_config(heads=HEADS, evaluate={"retrieval": {}})
    assert run(direct).evaluation.retrieval["map_at_r"] == pytest.approx(via_index["map_at_r"], abs=1e-9)


def test_embedding_map_can_be_turned_off_and_umap_is_named_when_missing(tiny_config, monkeypatch):
    from tasks.evaluate.projection import check_method

    cfg = tiny_config(heads=HEADS, evaluate={"embedding_map": {"method": "none"}})
    report = run(cfg).report
    assert not report.with_name("embedding_map.png").exists() and "embedding_map" not in report.read_text()
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install 'transferpipe\[umap\]'"):
        check_method("umap")


def test_index_command_prints_its_measurements_and_names_bad_flags(tiny_config, tmp_path):
    pytest.importorskip("faiss")
    import yaml
    from typer.testing import CliRunner

    from flows.cli import app

    cfg = tiny_config(heads=HEADS)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    runner = CliRunner()
    done = runner.invoke(app, ["index", str(path)], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "flat (built)" in done.output and "recall@10 vs exact" in done.output and "index.faiss" in done.output
    bad = runner.invoke(app, ["index", str(path), "--kind", "lsh"])
    assert bad.exit_code == 2 and "--kind 'lsh'" in bad.output and "hnsw" in bad.output
    missing = runner.invoke(app, ["index", str(path), "--split", "holdout"])
    assert missing.exit_code == 2 and "no such split" in missing.output


@pytest.mark.parametrize("damage", ["truncate", "permute"])
def test_a_damaged_index_is_caught_by_its_checksum_set_aside_and_built_again(tiny_config, damage):
    """Before: a truncated index.faiss failed every run without naming it, and one whose vectors were permuted
    (same size) gave mAP@R 0.05 with rc 0 while `transferpipe index` called it cached."""
    faiss = pytest.importorskip("faiss")
    import numpy as np

    cfg = tiny_config(heads=HEADS, index={"kind": "flat"})
    built = run(cfg, "index").index
    if damage == "truncate":
        built.path.write_bytes(built.path.read_bytes()[: built.index_bytes // 2])
    else:
        index = faiss.read_index(str(built.path))
        vectors = index.reconstruct_n(0, index.ntotal)
        permuted = faiss.IndexFlatIP(index.d)
        permuted.add(np.ascontiguousarray(vectors[::-1]))
        faiss.write_index(permuted, str(built.path))
        assert built.path.stat().st_size == built.index_bytes
    again = run(cfg, "index").index
    assert not again.cache_hit and again.sha256 == built.sha256
    assert len(list((cfg.cache_dir / "indexes" / "quarantine").iterdir())) == 1
    faiss_cfg = tiny_config(heads=HEADS, index={"kind": "flat"}, evaluate={"retrieval": {"index": "faiss"}})
    assert run(faiss_cfg).evaluation.retrieval["index_recall"] == 1.0
