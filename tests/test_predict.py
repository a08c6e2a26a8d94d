"""``transferpipe predict``: the trust computations against their definitions and a library (MAPIE), and the
stage end to end on a real flow: rows, ids, cache hits, a folder that grows, bad images, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image, make_imagefolder

from flows.execution.local import local_run_settings
from tasks.predict import trust

REPO = Path(__file__).resolve().parents[1]


def _exchangeable(rng: np.random.Generator, n: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels drawn from them: rows are exchangeable, the model is calibrated."""
    probs = rng.dirichlet(np.full(classes, 0.7), size=n)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize("method, penalty", [("lac", (0.0, 0)), ("aps", (0.0, 0)), ("raps", (0.05, 1))])
def test_split_conformal_covers_its_target_over_random_splits(method, penalty):
    rng = np.random.default_rng(0)
    probs, labels = _exchangeable(rng, 4000)
    coverage, target = [], 0.9
    for _ in range(100):
        order = rng.permutation(len(labels))
        cal, test = order[:500], order[500:]
        q = trust.threshold(probs[cal], labels[cal], target, method, penalty)
        mask = trust.sets(probs[test], q, method, penalty)
        coverage.append(mask[np.arange(len(test)), labels[test]].mean())
    assert abs(np.mean(coverage) - target) < 0.01, np.mean(coverage)
    # a floor against gross failure; RAPS's scores bunch in steps of lambda, so one split of 100 reaches 0.848
    assert min(coverage) > (0.84 if method == "raps" else 0.85)


def test_raps_is_aps_plus_a_penalty_per_rank_beyond_k_and_keeps_sets_small():
    """RAPS (Angelopoulos et al., 2021): the APS score plus ``lambda * max(0, rank - k_reg)`` (rank from 1);
    without a penalty it is APS; a penalty makes the large sets of uncertain rows smaller at the same coverage."""
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    labels = np.array([2, 0])
    # row 0: class 2 is ranked 3rd, mass 1.0, penalty 0.1 * (3 - 1); row 1: class 0 ranked 3rd, mass 1.0
    assert np.allclose(trust.scores(probs, labels, "raps", (0.1, 1)), [1.2, 1.2])
    assert np.allclose(trust.scores(probs, labels, "raps", (0.0, 0)), trust.scores(probs, labels, "aps"))
    assert trust.sets(probs, 0.85, "raps", (0.1, 1)).tolist() == [[True, False, False], [False, True, False]]
    rng = np.random.default_rng(3)
    flat, labels = _exchangeable(rng, 3000, classes=10)
    flat = (flat + 0.3) / (flat + 0.3).sum(axis=1, keepdims=True)  # uncertain rows: APS's sets grow
    cal, test = slice(0, 1500), slice(1500, None)
    size = {m: trust.sets(flat[test], trust.threshold(flat[cal], labels[cal], 0.9, m, pen), m, pen).sum(1).mean()
            for m, pen in (("aps", (0.0, 0)), ("raps", (0.2, 1)))}
    assert size["raps"] <= size["aps"], size


class _Given:
    """A fitted 'classifier' whose probabilities are its input: MAPIE then conformalises exactly ours."""

    def __init__(self, classes: int) -> None:
        self.classes_ = np.arange(classes)

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return np.asarray(X)

    def predict(self, X):
        return np.asarray(X).argmax(axis=1)

    def get_params(self, deep=True):
        return {"classes": len(self.classes_)}


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_lac_sets_equal_mapies(coverage):
    mapie = pytest.importorskip("mapie.classification")
    rng = np.random.default_rng(1)
    probs, labels = _exchangeable(rng, 1500)
    cal, test = slice(0, 600), slice(600, None)
    model = mapie.SplitConformalClassifier(_Given(5), confidence_level=coverage, conformity_score="lac", prefit=True)
    model.conformalize(probs[cal], labels[cal])
    theirs = model.predict_set(probs[test])[1][:, :, 0]
    ours = trust.sets(probs[test], trust.threshold(probs[cal], labels[cal], coverage, "lac"), "lac")
    assert ours.shape == theirs.shape and (ours == theirs).all()


def test_too_few_calibration_rows_are_refused_naming_both_numbers():
    probs, labels = _exchangeable(np.random.default_rng(2), 8)
    with pytest.raises(ValueError, match=r"has 8 labelled rows; split conformal needs at least 19"):
        trust.threshold(probs, labels, 0.95, "lac")
    assert trust.threshold(probs, labels, 0.8, "lac") <= 1  # 8 rows are enough for 80%


def test_temperature_recovers_a_known_one_and_keeps_top1():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, size=(3000, 4))
    true = trust.scaled(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)
    labels = np.array([rng.choice(4, p=p) for p in true])
    sharp = trust.scaled(true, 0.5)  # an overconfident model: T = 0.5 applied, so 2.0 undoes it
    t = trust.fit_temperature(sharp, labels)
    assert abs(t - 2.0) < 0.15, t
    assert (trust.scaled(sharp, t).argmax(1) == sharp.argmax(1)).all()
    assert trust.nll(trust.scaled(sharp, t), labels) < trust.nll(sharp, labels)


def test_ood_score_is_one_minus_the_nearest_cosine():
    bank = trust.unit_rows(np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    queries = trust.unit_rows(np.array([[2.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0]]))
    assert np.allclose(trust.ood_scores(queries, bank, chunk=2), [0.0, 1 - np.sqrt(0.5), 1.0])


def test_ood_figures_against_their_definitions():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(4)
    inside, outside = rng.normal(0, 1, 2000), rng.normal(1.5, 1, 500)
    found = trust.ood_figures(inside, outside)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(2000), np.ones(500)], np.r_[inside, outside])
    assert abs(found["auroc"] - np.trapezoid(tpr, fpr)) < 1e-9
    # FPR95: OOD images passing where 95% of the in-distribution pass (the ROC read at 5% of inside flagged)
    assert abs(found["fpr95"] - (1 - tpr[np.searchsorted(fpr, 0.05, side="right") - 1])) < 0.01
    assert trust.ood_figures(np.zeros(10), np.ones(10)) == {"auroc": 1.0, "fpr95": 0.0, "ood_rows": 10.0}


# ------------------------------------------------------------------ the stage, on a real flow


@pytest.fixture
def scored(tmp_path, tiny_config):
    """A tiny experiment with a logistic and a kNN head, 20 images a class (about 12 val rows calibrate)."""
    images = make_imagefolder(tmp_path / "labelled", n_per_class=20)
    new = tmp_path / "new"
    for c in range(3):  # new images of the known classes, two folders with the same file names
        for i in range(4):
            make_image(new / f"day{i % 2}" / f"{c}-{i // 2}.png", c, 500 + i)
    make_image(new / "day0" / "odd.png", 7, 1)  # a colour no class has
    return new, lambda finetune=None, **over: tiny_config(
        data={"root": str(images)}, heads=[{"kind": "logistic", "C": [1.0]}, {"kind": "knn", "k": [3]}],
        predict={"data": {"source": "files", "root": str(new)}, "coverage": 0.8, **over},
        **({"finetune": finetune} if finetune else {}))


def _table(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@pytest.mark.slow
def test_run_with_a_predict_section_scores_new_images_and_a_second_run_is_a_hit(scored):
    from flows.pipeline import pipeline_flow

    new, config = scored
    odd = new.parent / "odd"
    for i in range(5):
        make_image(odd / f"{i}.png", 5 + i, 0)  # colours no class has
    cfg = config(ood_data={"source": "files", "root": str(odd)})
    with local_run_settings():
        first = pipeline_flow(cfg).outputs["predict"][0]
        again = pipeline_flow(cfg).outputs["predict"][0]
        from prefect.artifacts import Artifact

        published = Artifact.get("tiny-report")  # the run's report on its page, the served model's trust after it
    rows = _table(first.path)
    assert first.rows == len(rows) == 13 and not first.cache_hit
    assert {"day0/0-0.png", "day1/0-0.png"} <= {r["id"] for r in rows}  # relative paths: one basename, two rows
    assert len({r["id"] for r in rows}) == 13
    assert all(r["path"] == str(new / r["id"]) for r in rows)
    assert all(r["top_labels"][0] == r["label"] and len(r["top_labels"]) == 3 for r in rows)
    assert all(abs(sum(r["top_probabilities"]) - 1) < 1e-6 or len(r["top_probabilities"]) < 3 for r in rows)
    assert all(r["set_size"] == len(r["prediction_set"]) for r in rows)
    assert first.single + first.empty <= first.rows and first.test["rows"] > 0
    assert 0 < first.temperature < 20 and first.calibration["val_rows"] >= 4  # coverage 0.8 needs 4
    assert again.cache_hit and again.rows_scored == 0 and again.path == first.path
    assert first.model in ("logistic", "knn")  # the evaluation's pick on val
    assert first.test["ood"]["ood_rows"] == 5 and 0 <= first.test["ood"]["auroc"] <= 1
    report = (first.path.parent / "report.md").read_text()
    assert f"Coverage {first.test['coverage']:.3f}" in report and "| rank of the true class |" in report
    assert published is not None and published.data.endswith(report) and "how far to trust them" in published.data
    from storage.results import query

    served = next(r for r in query(cfg.cache_dir) if r["model"] == first.model and r["shots"] == "all")
    assert served["coverage"] == first.test["coverage"] and served["coverage_target"] == 0.8
    assert served["ood_auroc"] == first.test["ood"]["auroc"] and served["predict_key"] == first.key


@pytest.mark.slow
def test_the_fine_tuned_model_scores_new_images_through_its_checkpoint(scored):
    """``model: finetuned``: every split is extracted again through the best checkpoint (cached like any backbone)
    and its own classifier scores them: the rows' labels and probabilities are the fine-tuned network's own,
    run end to end on the decoded images, with the val temperature applied."""
    import torch

    from flows.pipeline import pipeline_flow
    from storage import checkpoints
    from tasks.backbones.config import resolve
    from tasks.backbones.models import load_model
    from tasks.data.images import load_rgb

    new, config = scored
    with local_run_settings(), pytest.raises(ValueError, match="predict.model finetuned: this config fine-tunes nothing"):
        pipeline_flow(config(model="finetuned"), stop_after="predict")
    tune = {"enabled": True, "epochs": 2, "batch_size": 8, "num_workers": 0, "warmup_epochs": 0.5,
            "early_stopping": None}
    cfg = config(finetune=tune, model="finetuned")
    with local_run_settings():
        first = pipeline_flow(cfg)
        again = pipeline_flow(cfg).outputs["predict"][0]
    done = first.outputs["predict"][0]
    assert done.model == "finetuned" and done.head.startswith("finetune:") and done.rows == 13
    assert again.cache_hit and again.rows_scored == 0
    model = load_model(resolve(cfg.backbone, cfg.cache_dir), num_classes=3)
    model.load_state_dict(checkpoints.load(first.outputs["finetune"][0].best_checkpoint)["model"])
    pre = resolve(cfg.backbone, cfg.cache_dir).preprocess
    rows = _table(done.path)
    with torch.inference_mode():
        logits = model.eval()(pre.normalize(torch.stack([pre(load_rgb(Path(r["path"]))) for r in rows]))).double()
    probs = torch.softmax(logits / done.temperature, dim=1).numpy()
    classes = ["class0", "class1", "class2"]
    assert [r["label"] for r in rows] == [classes[i] for i in probs.argmax(1)]
    assert max(abs(r["probability"] - probs[i].max()) for i, r in enumerate(rows)) < 5e-3  # float16 features


@pytest.mark.slow
def test_predict_with_a_named_head_extracts_only_what_is_new(scored, tmp_path):
    from flows.pipeline import pipeline_flow

    new, config = scored
    cfg = config(model="knn").model_copy(update={"extract": config().extract.model_copy(update={"piece_size": 4})})
    pieces = cfg.cache_dir / "features" / "pieces"
    with local_run_settings():
        first = pipeline_flow(cfg, stop_after="predict")
        before = set(pieces.glob("*.h5"))
        make_image(new / "day9" / "late.png", 1, 900)  # one more image lands
        grown = pipeline_flow(cfg, stop_after="predict")
    p1, p2 = first.outputs["predict"][0], grown.outputs["predict"][0]
    assert p1.model == "knn" and p2.rows == p1.rows + 1 and p2.key != p1.key
    assert p2.rows_scored == p2.rows and "day9/late.png" in {r["id"] for r in _table(p2.path)}
    added = set(pieces.glob("*.h5")) - before
    assert 1 <= len(added) <= 2 < len(before), len(added)  # only the piece that changed extracts
    assert all(s.cache_hit for s in grown.features.values())  # the experiment's own splits untouched


@pytest.mark.slow
def test_bad_images_are_listed_beside_the_table_and_bad_input_is_one_line(scored, tmp_path):
    from flows.pipeline import pipeline_flow

    new, config = scored
    (new / "day0" / "broken.png").write_bytes(b"not a png")
    cfg = config(data={"source": "files", "root": str(new), "on_bad_image": "skip"})
    with local_run_settings():
        done = pipeline_flow(cfg, stop_after="predict").outputs["predict"][0]
        assert done.bad_images == 1 and done.rows == 13
        listed = (done.path.parent / "bad_images.csv").read_text()
        assert "broken.png" in listed
        with pytest.raises(ValueError, match=r"predict.model 'nope': no such head; heads: logistic, knn or recommended"):
            pipeline_flow(config(model="nope"), stop_after="predict")
        with pytest.raises(ValueError, match=r"needs at least 19"):
            pipeline_flow(config(coverage=0.95, data={"source": "files", "root": str(new), "on_bad_image": "skip"}),
                          stop_after="predict")
        with pytest.raises(ValueError, match="inside the cache folder"):
            pipeline_flow(config(data={"source": "files", "root": str(cfg.cache_dir)}), stop_after="predict")


def test_a_config_without_predict_data_is_refused_before_any_compute(tiny_config):
    from flows.planning.graph import walk

    steps = walk(tiny_config(heads=[{"kind": "knn", "k": [1]}], predict={"model": "knn"}), "predict")
    assert steps[-1].stage == "predict" and "predict.data: no images to score" in steps[-1].why[0]


def test_predict_plans_after_the_evaluation_only_when_asked(tiny_config, tmp_path):
    from flows.planning.nodes import nodes

    plain = tiny_config(heads=[{"kind": "knn", "k": [1]}])
    asked = tiny_config(heads=[{"kind": "knn", "k": [1]}], predict={"data": {"source": "files", "root": str(tmp_path)}})
    assert [s.name for s in nodes(plain)] == ["extract", "heads", "evaluate"]
    assert [s.name for s in nodes(asked)] == ["extract", "heads", "evaluate", "predict"]
    assert [s.name for s in nodes(plain, "predict")][-2:] == ["evaluate", "predict"]
    # with a quality: section, predict and export-model see the same evaluation as run (quality feeds it)
    checked = tiny_config(heads=[{"kind": "knn", "k": [1]}], quality={"neighbours": 3})
    assert "quality" in [s.name for s in nodes(checked, "predict")] and "quality" in [s.name for s in nodes(checked)]
    assert "quality" in [s.name for s in nodes(checked, "export-model")]
    assert "quality" not in [s.name for s in nodes(checked, "heads")]


@pytest.mark.slow
def test_the_predict_command_writes_parquet_and_copies_it_out(scored, tmp_path):
    import yaml

    new, config = scored
    cfg = config()
    raw = json.loads(cfg.model_dump_json(exclude={"predict"}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {"PREFECT_HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)

    out = tmp_path / "out" / "preds.parquet"
    refused = cli("predict", str(path), "--data", str(new), "--out", str(out))
    assert refused.returncode == 2 and "does not exist or is not writable" in refused.stderr
    out.parent.mkdir()
    done = cli("predict", str(path), "--data", str(new), "--out", str(out), "--method", "aps", "--coverage", "0.8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images scored" in done.stdout and f"copied to {out}" in done.stdout
    assert len(_table(out)) == 13
    bad = cli("predict", str(path), "--data", str(new), "--method", "thr")
    assert bad.returncode == 2 and "--method 'thr': use one of lac, aps, raps" in bad.stderr


@pytest.mark.slow
def test_a_run_killed_while_scoring_scores_only_the_blocks_it_lacks(scored, monkeypatch):
    """Issue 44.2: each scored block is kept as a part until the table is published; the retry reads them."""
    from flows.execution.stage_tasks import StageFailed
    from flows.pipeline import pipeline_flow
    from storage.records import PredictionFiles
    from tasks.predict import stage

    new, config = scored
    cfg = config(model="knn")
    monkeypatch.setattr(stage, "BLOCK_ROWS", 4)  # 13 new images: blocks of 4, 4, 4, 1
    monkeypatch.setenv("TRANSFERPIPE_FAULTS", "predict.block:2")  # dies after the second block is kept
    with local_run_settings():
        with pytest.raises(StageFailed, match="injected fault at predict.block"):
            pipeline_flow(cfg, stop_after="predict")
        parts = sorted(PredictionFiles.of(cfg.cache_dir, "x").parts.parent.glob("*.tmp-parts/*.parquet"))
        assert len(parts) == 2
        monkeypatch.delenv("TRANSFERPIPE_FAULTS")
        done = pipeline_flow(cfg, stop_after="predict").outputs["predict"][0]
    assert done.rows == 13 and done.rows_scored == 5  # the two kept blocks are read, not scored again
    rows = _table(done.path)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len({r["id"] for r in rows}) == 13
    assert not PredictionFiles(done.path.parent).parts.exists()  # published: the parts are gone
