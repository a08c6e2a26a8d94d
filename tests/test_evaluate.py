"""Metrics on hand-checked cases, reports that hold what they claim, the results registry."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.evaluate.plan import ModelReport
from tasks.evaluate.metrics import classification_metrics, expected_calibration_error
from tasks.evaluate.report import write_report


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nll_is_sklearn_log_loss_and_counts_the_zero_probabilities(dtype):
    """A kNN head gives its true class exactly 0 on some images: NLL clips them as log_loss does (machine eps of
    the dtype, not 1e-12), and the metrics say how many there were."""
    from sklearn.metrics import log_loss

    y = np.array([0, 1, 2, 2, 1])
    proba = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0, 1.0, 0], [0.2, 0.2, 0.6], [1.0, 0, 0]], dtype=dtype)
    m = classification_metrics(y, proba, proba, n_classes=3)
    assert m["nll"] == pytest.approx(log_loss(y, proba, labels=[0, 1, 2]), rel=1e-6)
    assert m["nll_zero"] == 2
    assert classification_metrics(y[:2], proba[:2], proba[:2], n_classes=3)["nll_zero"] == 0


def test_a_class_without_test_images_has_no_accuracy_and_does_not_drag_macro_f1():
    y = np.array([0, 0, 1, 1])  # class 2 has no test image (a class of one image keeps it for training)
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    m = classification_metrics(y, proba, proba, n_classes=3)
    assert m["per_class_accuracy"] == [0.5, 1.0, None]
    json.dumps(m, allow_nan=False)  # the report stays valid JSON
    # F1: class 0 p=1 r=1/2 -> 2/3; class 1 p=2/3 r=1 -> 0.8; class 2 neither in y nor predicted: not averaged
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


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
    from tasks.backbones.config import BackboneConfig, resolve
    from tasks.evaluate.plan import ModelToEvaluate, plan_evaluation

    models = [ModelToEvaluate(name="m", kind="logistic", head_key="h" * 64)]
    return plan_evaluation("exp", "t" * 64, cache_dir / "m.json", cache_dir, resolve(BackboneConfig(weights="none")),
                           ["a", "b"], models, context=context)


def test_report_files_hold_what_they_claim(tmp_path):
    y = np.array([0, 1, 1, 0])
    good = classification_metrics(y, np.eye(2)[y] * 0.9 + 0.05, np.eye(2)[y] * 0.9 + 0.05, 2)
    bad = classification_metrics(y, np.eye(2)[1 - y], None, 2)
    knn = classification_metrics(y, np.eye(2)[1 - y], np.eye(2)[1 - y], 2)  # the true class gets 0 every time
    models = [
        ModelReport(name="knn", kind="knn", layer="penultimate", shot="all", seeds=1, metrics=knn),
        ModelReport(name="worse", kind="ridge", layer="penultimate", shot="all", seeds=1, metrics=bad),
        ModelReport(name="better", kind="logistic", layer="penultimate", shot="all", seeds=1, metrics=good),
        ModelReport(name="better", kind="logistic", layer="penultimate", shot=1, seeds=3, metrics=bad),
    ]
    plan = _plan(tmp_path, {"stages": {"extract": {"seconds": 1.0, "cache_hit": True}}})
    paths = write_report(plan, models, seconds=0.5)
    assert paths["json"].parent == tmp_path / "runs" / "exp" / plan.key[:12]
    report = json.loads(paths["json"].read_text())
    assert [m["name"] for m in report["models"]] == ["better", "knn", "worse", "better"]  # ranked by top-1
    md = paths["md"].read_text()
    assert "NLL is scikit-learn's `log_loss`" in md and "`knn, all labels per class` gave it to 4 of 4 test images" in md
    assert "| better | logistic | all |  | 1.0 |" in md and "## Few-shot curve" in md and "| extract | 1.0 | hit |" in md
    for name in ("confusion_matrix", "reliability", "few_shot"):
        assert paths[name].stat().st_size > 1000 and paths[name].read_bytes()[:4] == b"\x89PNG"


def test_demo_comparison_pairs_each_model_and_shot_with_its_random_init_twin():
    from tasks.evaluate.report import compare_runs

    def model(name, shot, top1):
        return ModelReport(name=name, kind="logistic", layer="penultimate", shot=shot, seeds=1, metrics={"top1": top1})

    pretrained = [model("logistic", "all", 0.95), model("finetuned", "all", 0.97), model("logistic", 1, 0.6),
                  model("knn", 5, 0.8)]
    random = [model("logistic", 1, 0.5), model("logistic", "all", 0.9), model("finetuned", "all", 0.87)]
    assert compare_runs(pretrained, random) == [
        {"model": "LP-FT (fine-tuned)", "shots": "all", "pretrained": "0.970", "random": "0.870", "gain": "+10.0 pts"},
        {"model": "knn", "shots": "5", "pretrained": "0.800", "random": "-", "gain": "-"},
        {"model": "logistic", "shots": "1", "pretrained": "0.600", "random": "0.500", "gain": "+10.0 pts"},
        {"model": "logistic", "shots": "all", "pretrained": "0.950", "random": "0.900", "gain": "+5.0 pts"},
    ]


def test_a_thousand_classes_keep_top_confusions_not_a_million_cells(tmp_path):
    from PIL import Image

    from tasks.evaluate.plan import ModelReport
    from tasks.evaluate.plots import _confusion_plot

    n_classes = 1000
    y = np.repeat(np.arange(n_classes), 3)
    scores = np.eye(n_classes)[y]
    scores[y == 7, 7], scores[y == 7, 42] = 0.0, 1.0  # every 7 is called 42
    scores[np.flatnonzero(y == 3)[:2], 3], scores[np.flatnonzero(y == 3)[:2], 9] = 0.0, 1.0  # two 3s are 9s
    m = classification_metrics(y, scores, None, n_classes=n_classes)
    assert m["confusion_matrix"] is None
    assert m["top_confusions"] == [{"true": 7, "predicted": 42, "count": 3}, {"true": 3, "predicted": 9, "count": 2}]
    assert m["top1"] == pytest.approx(1 - 5 / 3000)
    report = ModelReport(name="knn", kind="knn", layer="penultimate", shot="all", seeds=1, metrics=m)
    path = _confusion_plot(tmp_path / "confusion.png", report, [f"class{i}" for i in range(n_classes)])
    width, height = Image.open(path).size
    assert width < 1500 and height < 1500  # a readable chart, not a 1000 x 1000 grid


# --------------------------------------------------------------------------- intervals


def test_bootstrap_intervals_are_seeded_and_as_wide_as_the_binomial_says():
    from tasks.evaluate.intervals import bootstrap_interval, top1_interval

    hits = np.zeros(1000, dtype=int)
    hits[:900] = 1  # 90% top-1 on 1,000 images: standard error sqrt(0.9 * 0.1 / 1000) = 0.0095
    lo, hi = top1_interval(hits, seeds=1)
    assert lo < 0.9 < hi and (lo, hi) == top1_interval(hits, seeds=1)  # seeded: the same every time
    assert (hi - lo) == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 1000), rel=0.15)
    small = bootstrap_interval(hits[::10])  # 100 images: about sqrt(10) times as wide
    assert (small[1] - small[0]) > 2.5 * (hi - lo)
    # three seeds: an image two seeds got right counts 2/3
    lo3, hi3 = top1_interval(np.array([3, 2, 0, 3] * 50), seeds=3)
    assert lo3 < np.mean(np.array([3, 2, 0, 3]) / 3) < hi3


def test_paired_intervals_see_what_two_separate_intervals_cannot():
    from tasks.evaluate.intervals import pack_hits, paired_difference, top1_interval, unpack_hits

    rng = np.random.default_rng(0)
    b = (rng.random(300) < 0.8).astype(int)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:9]] = 1  # a = b plus 9 more images right: +3 points
    diff, lo, hi = paired_difference(a, 1, b, 1)
    assert diff == pytest.approx(9 / 300) and lo > 0  # paired: the gain is clear
    a_lo, a_hi = top1_interval(a, 1)
    b_lo, b_hi = top1_interval(b, 1)
    assert a_lo < b_hi  # unpaired, the two intervals overlap
    assert paired_difference(b, 1, b, 1) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same test images: 300 and 299"):
        paired_difference(a, 1, b[:-1], 1)
    assert np.array_equal(unpack_hits(pack_hits(np.array([0, 1, 3, 255]))), [0, 1, 3, 255])
    with pytest.raises(ValueError, match="0..255"):
        pack_hits(np.array([256]))


def test_the_comparison_marks_a_gain_whose_paired_interval_excludes_zero():
    from tasks.evaluate.intervals import pack_hits
    from tasks.evaluate.report import compare_runs

    def model(name, hits, images="same"):
        hits = np.asarray(hits)
        return ModelReport(name=name, kind="logistic", layer="penultimate", shot="all", seeds=1,
                           metrics={"top1": float(hits.mean()), "n": len(hits), "hits": pack_hits(hits),
                                    "top1_ci": [0.0, 1.0], "test_images": images})

    b = np.array([1] * 160 + [0] * 40)
    clear = b.copy()
    clear[160:180] = 1  # +10 points, on the same images
    noise = np.roll(b, 7)  # the same top-1, other images right
    rows = compare_runs([model("clear", clear), model("noise", noise), model("elsewhere", clear, images="other")],
                        [model("clear", b), model("noise", b), model("elsewhere", b)])
    by = {r["model"]: r for r in rows}
    assert by["clear"]["gain"].startswith("+10.0 pts (+") and by["clear"]["gain"].endswith(" *")
    assert by["noise"]["gain"].startswith("+0.0 pts (-") and not by["noise"]["gain"].endswith("*")
    assert by["elsewhere"]["gain"] == "+10.0 pts"  # other test images: no paired interval
    assert by["clear"]["pretrained"] == "0.900 (0.000–1.000)"


# --------------------------------------------------------------------------- the model chosen on validation


def test_the_recommended_model_is_chosen_on_validation_not_test():
    from tasks.evaluate.report import recommended

    def model(name, shot, val, test, seconds=1.0):
        return ModelReport(name=name, kind="logistic", layer="penultimate", shot=shot, seeds=1,
                           metrics={"top1": test}, val_accuracy=val, train_seconds=seconds)

    models = [model("best on test", "all", 0.80, 0.95), model("best on val", "all", 0.90, 0.85)]
    assert recommended(models).name == "best on val"
    tied = [model("few", 5, 0.9, 0.9), model("all", "all", 0.9, 0.9, seconds=9), model("cheap", "all", 0.9, 0.9)]
    assert recommended(tied).name == "cheap"  # ties: all labels over few-shot, then the cheaper
    assert recommended([model("unknown", "all", None, 0.9)]) is None


def test_an_evaluation_recommends_a_loadable_model_and_the_registry_keeps_it(tiny_config):
    from helpers import split_plans
    from storage.results import query
    from tasks.backbones.config import resolve
    from tasks.data.manifest import Manifest
    from tasks.evaluate.plan import ModelToEvaluate, plan_evaluation
    from tasks.evaluate.stage import evaluate
    from tasks.extract.stage import extract_split
    from tasks.heads.configs import KNNConfig, LogisticConfig
    from tasks.heads.plan import fits, plan_heads
    from tasks.heads.stage import load_head, load_split, train_head

    cfg = tiny_config()
    feats = {s: extract_split(p) for s, p in split_plans(cfg).items()}
    plans = plan_heads([LogisticConfig(kind="logistic", C=[0.1, 1.0]), KNNConfig(kind="knn", k=[1, 3], shots=[1, "all"])],
                       feats["train"].key, feats["val"].key, cfg.cache_dir)
    for p in plans:
        train_head(p)
    models = [ModelToEvaluate(name=p.head.label, kind=p.head.kind, shot=shot, seed=seed, head_key=key)
              for p in plans for shot, seed, key in fits(p)]
    plan = plan_evaluation("tiny", feats["test"].key, feats["test"].manifest, cfg.cache_dir, resolve(cfg.backbone),
                           Manifest.load(feats["train"].manifest).classes, models)
    result = evaluate(plan)
    vals = {(m.name, str(m.shot)): m.val_accuracy for m in result.models}
    assert all(v is not None and 0 <= v <= 1 for v in vals.values())
    report = json.loads(plan.files.report_json.read_text())
    rec = report["recommended"]
    assert rec["val_accuracy"] == max(vals.values()) and (rec["model"], rec["shots"]) in vals
    head = load_head(cfg.cache_dir, rec["artifact"])  # the recommended model, loaded by its key
    X, y = load_split(cfg.cache_dir, feats["test"].key, "penultimate")
    top1 = float(np.mean(head.predict(X) == y))
    assert top1 == pytest.approx(rec["test_top1"]) or rec["shots"] != "all"  # a few-shot pick averages its seeds
    assert "Recommended (highest validation top-1" in result.report.read_text()
    rows = query(cfg.cache_dir, "tiny")
    assert sum(r["recommended"] for r in rows) == 1 and all(r["top1_lo"] <= r["top1"] <= r["top1_hi"] for r in rows)


def test_a_registry_from_an_earlier_version_gets_the_new_columns(tmp_path):
    import sqlite3

    from storage.results import append, query, registry_path

    path = registry_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:  # 0.5's table: no interval, validation or recommendation columns
        conn.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, created_at TEXT, experiment TEXT, run_key TEXT, "
                     "model TEXT, kind TEXT, layer TEXT, shots TEXT, seeds INTEGER, backbone TEXT, weights TEXT, "
                     "features_key TEXT, n_test INTEGER, top1 REAL, top5 REAL, balanced_accuracy REAL, macro_f1 REAL, "
                     "nll REAL, ece REAL, report TEXT)")
        conn.execute("INSERT INTO results (experiment, run_key, model, shots, top1) VALUES ('old', 'r0', 'm', 'all', 0.5)")
    append(tmp_path, [{"experiment": "new", "run_key": "r1", "model": "m", "shots": "all", "top1": 0.7,
                       "top1_lo": 0.6, "top1_hi": 0.8, "val_accuracy": 0.75, "recommended": 1}])
    rows = {r["experiment"]: r for r in query(tmp_path)}
    assert rows["old"]["top1_lo"] is None and rows["old"]["recommended"] is None
    assert rows["new"]["top1_hi"] == 0.8 and rows["new"]["recommended"] == 1
