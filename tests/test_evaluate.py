"""Metrics on hand-checked cases, reports that hold what they claim, the results registry."""
from __future__ import annotations

import json

import numpy as np
import pytest

from storage import results as registry
from tasks.evaluate import ModelReport, classification_metrics, expected_calibration_error
from tasks.report import write_report


def test_metrics_on_a_hand_checked_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([
        [0.8, 0.1, 0.1],  # right, confident
        [0.4, 0.5, 0.1],  # wrong: says 1
        [0.2, 0.7, 0.1],  # right
        [0.1, 0.6, 0.3],  # right
        [0.3, 0.3, 0.4],  # right, barely
        [0.5, 0.2, 0.3],  # wrong: says 0
    ])
    m = classification_metrics(y, proba, proba, n_classes=3)
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == [0.5, 1.0, 0.5]
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1 per class: class 0 p=1/2 r=1/2 -> 0.5; class 1 p=2/3 r=1 -> 0.8; class 2 p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.7, 0.6, 0.4, 0.3])))
    assert m["top5"] is None  # fewer than 5 classes


def test_ece_by_hand():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.65, 0.35]])
    ece, bins = expected_calibration_error(y, proba, bins=10)
    # bin (0.9, 1.0]: conf 0.95, acc 1.0 (2 samples); bin (0.6, 0.7]: conf 0.65, acc 0.5 (2 samples)
    assert ece == pytest.approx(0.5 * 0.05 + 0.5 * 0.15)
    assert sum(b["count"] for b in bins) == 4
    perfect = np.eye(2)[y]
    assert expected_calibration_error(y, perfect)[0] == pytest.approx(0.0)


def test_top5_and_scores_without_probabilities():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 50)
    scores = rng.normal(size=(50, 6))
    scores[np.arange(50), y] += 1.0
    m = classification_metrics(y, scores, None, n_classes=6)
    expected_top5 = np.mean([y[i] in np.argsort(-scores[i])[:5] for i in range(50)])
    assert m["top5"] == pytest.approx(expected_top5)
    assert m["nll"] is None and m["ece"] is None and m["reliability"] is None


def _plan(cache_dir, context):
    from tasks.backbones import BackboneConfig, resolve
    from tasks.evaluate import ModelToEvaluate, plan_evaluation

    models = [ModelToEvaluate(name="m", kind="logistic", head_key="h" * 64)]
    return plan_evaluation("exp", "t" * 64, cache_dir / "m.json", cache_dir, resolve(BackboneConfig(weights="none")),
                           ["a", "b"], models, context=context)


def test_report_files_hold_what_they_claim(tmp_path):
    y = np.array([0, 1, 1, 0])
    good = classification_metrics(y, np.eye(2)[y] * 0.9 + 0.05, np.eye(2)[y] * 0.9 + 0.05, 2)
    bad = classification_metrics(y, np.eye(2)[1 - y], None, 2)
    models = [
        ModelReport(name="worse", kind="ridge", layer="penultimate", shot="all", seeds=1, metrics=bad),
        ModelReport(name="better", kind="logistic", layer="penultimate", shot="all", seeds=1, metrics=good),
        ModelReport(name="better", kind="logistic", layer="penultimate", shot=1, seeds=3, metrics=bad),
    ]
    plan = _plan(tmp_path, {"stages": {"extract": {"seconds": 1.0, "cache_hit": True}}})
    paths = write_report(plan, models, seconds=0.5)
    assert paths["json"].parent == tmp_path / "runs" / "exp" / plan.key[:12]
    report = json.loads(paths["json"].read_text())
    assert [m["name"] for m in report["models"]] == ["better", "worse", "better"]  # ranked by top-1
    md = paths["md"].read_text()
    assert "| better | logistic | all | 1.0 |" in md and "## Few-shot curve" in md and "| extract | 1.0 | hit |" in md
    for name in ("confusion_matrix", "reliability", "few_shot"):
        assert paths[name].stat().st_size > 1000 and paths[name].read_bytes()[:4] == b"\x89PNG"


def test_registry_rows_sorting_and_filters(tmp_path):
    registry.append(tmp_path, [
        {"experiment": "a", "model": "m1", "top1": 0.5, "ece": 0.2},
        {"experiment": "a", "model": "m2", "top1": 0.9, "ece": 0.3},
        {"experiment": "b", "model": "m3", "top1": 0.7, "ece": None},
    ])
    assert [r["model"] for r in registry.query(tmp_path)] == ["m2", "m3", "m1"]
    assert [r["model"] for r in registry.query(tmp_path, sort="ece")] == ["m1", "m2", "m3"]  # lower is better; NULL last
    assert [r["model"] for r in registry.query(tmp_path, experiment="a")] == ["m2", "m1"]
    with pytest.raises(ValueError, match="--sort 'speed' is not one of top1"):
        registry.query(tmp_path, sort="speed")
    assert registry.query(tmp_path / "empty") == []


def test_results_command_prints_the_registry(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    registry.append(tmp_path, [
        {"experiment": "exp-a", "model": "logistic", "shots": "all", "backbone": "resnet18", "weights": "none",
         "top1": 0.91, "macro_f1": 0.9, "ece": 0.05, "features_key": "f" * 64, "created_at": "2026-11-22T08:00:00"},
        {"experiment": "exp-b", "model": "knn", "shots": "5", "backbone": "resnet18", "weights": "/w/best.pt",
         "top1": 0.7, "macro_f1": 0.69, "ece": None, "features_key": "f" * 64, "created_at": "2026-11-22T08:01:00"},
    ])
    runner = CliRunner()
    result = runner.invoke(app, ["results", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.index("exp-a") < result.output.index("exp-b") and "best.pt" in result.output
    only_b = runner.invoke(app, ["results", "--experiment", "exp-b", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert "exp-a" not in only_b.output and "1 evaluated model(s)" in only_b.output
    bad = runner.invoke(app, ["results", "--sort", "speed", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "is not one of" in bad.output
