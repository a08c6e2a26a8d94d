"""Evaluation on the test split: metrics, plots and reports for every head and the fine-tuned model.

Metrics come from scikit-learn where it has them (accuracy, top-k, balanced
accuracy, macro-F1, confusion matrix, log loss); expected calibration error is
the standard 15-bin estimate over the top-class confidence. Few-shot heads are
evaluated per (shot, seed) and averaged per shot into a label-efficiency curve.
The stage writes the experiment's report (:mod:`tasks.report`) and its rows in
the results registry once, when it computes; a finished evaluation is reused.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from storage import checkpoints, keys
from storage import results as registry
from storage.features import FeatureStore
from storage.head_store import read_meta
from storage.layout import CacheLayout
from storage.records import ReportFiles, Records
from tasks.backbones.config import BackboneSpec
from tasks.data.manifest import Manifest
from tasks.machine import pick_device
from tasks.softmax import softmax
from tasks.heads.stage import load_head, load_split
from tasks.intervals import pack_hits, top1_interval, unpack_hits
from tasks.embedding_map import MapConfig
from tasks.report import ranked, registry_rows, write_report
from tasks.result import StageResult
from tasks.retrieval import RetrievalConfig

ECE_BINS = 15


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE over equal-width confidence bins, and the reliability-diagram data per bin."""
    conf = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece, diagram = 0.0, []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        mean_conf = float(conf[mask].mean()) if n else 0.0
        ece += n / len(y) * abs(acc - mean_conf)
        diagram.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                        "accuracy": acc, "confidence": mean_conf})
    return float(ece), diagram


FULL_CONFUSION_MAX_CLASSES = 100  # above: the matrix is not stored (1000 classes = a million numbers per model)


def top_confusions(cm: np.ndarray, n: int = 20) -> list[dict[str, int]]:
    """The ``n`` largest off-diagonal cells: which true class is most often predicted as which."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:n]
    cells = [np.unravel_index(i, off.shape) for i in flat]
    return [{"true": int(i), "predicted": int(j), "count": int(off[i, j])} for i, j in cells if off[i, j] > 0]


def _top5(score, y: np.ndarray, scores: np.ndarray, labels: np.ndarray, rows: int = 4096) -> float:
    """scikit-learn's top-5 accuracy, over row chunks: it argsorts every score (400 MB at 50k x 1,000 classes)."""
    hits = sum(score(y[i : i + rows], scores[i : i + rows], k=5, labels=labels, normalize=False)
               for i in range(0, len(y), rows))
    return float(hits / len(y))


def _balanced_accuracy(score, y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``; predicting a class absent from a small test set is normal
    at 1,000 classes, so scikit-learn's warning about it is not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(score(y, pred))


def log_loss(y: np.ndarray, proba: np.ndarray) -> tuple[float, int]:
    """``sklearn.metrics.log_loss`` (probabilities clipped to [eps, 1 - eps], eps the machine epsilon of their
    dtype) and how many images gave their true class probability 0, whose terms are the clip's ``-log(eps)``.

    Reads the true class's probability only: log_loss one-hot encodes y (50k x 1,000 classes: 1.4 GiB).
    """
    true = proba[np.arange(len(y)), y]
    eps = np.finfo(proba.dtype).eps
    clipped = np.clip(true, eps, 1 - eps).astype(np.float64)
    return float(-np.mean(np.log(clipped))), int(np.count_nonzero(true <= 0))


def classification_metrics(y: np.ndarray, scores: np.ndarray, proba: np.ndarray | None, n_classes: int) -> dict[str, Any]:
    """Every metric of one model on one test set; NLL and ECE need probabilities (else None)."""
    from sklearn.metrics import (
        accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score,
    )

    labels = np.arange(n_classes)
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    support = cm.sum(axis=1)
    per_class = [float(hit / n) if n else None for hit, n in zip(np.diag(cm), support)]  # None: no test image
    seen = np.flatnonzero(support + cm.sum(axis=0))  # classes in the test labels or predicted
    out: dict[str, Any] = {
        "n": int(len(y)),
        "top1": float(accuracy_score(y, pred)),
        "top5": _top5(top_k_accuracy_score, y, scores, labels) if n_classes >= 5 else None,
        "balanced_accuracy": _balanced_accuracy(balanced_accuracy_score, y, pred),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=seen, zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist() if n_classes <= FULL_CONFUSION_MAX_CLASSES else None,
        "top_confusions": top_confusions(cm),
        "nll": None, "nll_zero": None, "ece": None, "reliability": None,
        "hits": pack_hits(pred == y),  # per image: classified correctly (tasks.intervals)
    }
    if proba is not None:
        out["nll"], out["nll_zero"] = log_loss(y, proba)
        out["ece"], out["reliability"] = expected_calibration_error(y, proba)
    return out


class EvaluateConfig(BaseModel):
    """``evaluate:`` section: what the report computes besides the models' scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: RetrievalConfig | None = Field(None, description="Recall@k, precision@k and mAP@R of test queries")
    embedding_map: MapConfig = MapConfig()


class ModelToEvaluate(BaseModel):
    """A trained head (by artifact key) or the fine-tuned checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    layer: str = "penultimate"
    shot: int | str = "all"
    seed: int = 0
    head_key: str | None = None
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    tried: list[str] = Field(default_factory=list, description="the fine-tuning search's run keys (in the key: the "
                                                               "report lists them)")


class EvalPlan(BaseModel):
    """Every model to score on the test split, and what the experiment's report says besides the scores."""

    model_config = ConfigDict(frozen=True)

    key: str
    spec: dict[str, Any]
    experiment: str
    test_key: str
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    classes: list[str]
    models: list[ModelToEvaluate]
    device: str = "auto"
    retrieval: dict[str, Any] | None = Field(None, description="settings, queries' and gallery's feature keys, "
                                                                 "the FAISS index's settings (or None)")
    embedding_map: dict[str, Any] | None = Field(None, description="settings and the feature key of each split")
    context: dict[str, Any] = Field(default_factory=dict, description="report context (config, stage timings, keys); "
                                                                      "not in the key")

    @property
    def files(self) -> ReportFiles:
        return ReportFiles(CacheLayout(self.cache_dir).report(self.experiment, self.key))


class ModelReport(BaseModel):
    name: str
    kind: str
    layer: str
    shot: int | str
    seeds: int
    metrics: dict[str, Any]
    train_seconds: float = 0.0  # summed over seeds
    val_accuracy: float | None = None  # on the validation split, mean over seeds: what a recommendation may use
    artifacts: list[str] = Field(default_factory=list, description="head keys of its fits (best on val first), or "
                                                                   "the fine-tuning run's key")


class EvalResult(StageResult):
    key: str
    models: list[ModelReport]  # best first (test top-1)
    report: Path
    retrieval: dict[str, Any] | None = None


def plan_evaluation(experiment: str, test_key: str, manifest: Path, cache_dir: Path, backbone: BackboneSpec,
                    classes: list[str], models: list[ModelToEvaluate], device: str = "auto",
                    context: dict[str, Any] | None = None, retrieval: dict[str, Any] | None = None,
                    embedding_map: dict[str, Any] | None = None) -> EvalPlan:
    extras = {name: value for name, value in (("retrieval", retrieval), ("embedding_map", embedding_map)) if value}
    spec = keys.evaluation_spec(experiment, test_key, [
        m.model_dump(mode="json", exclude={"checkpoint", "train_seconds"}) | {"ckpt": _ckpt_id(m)} for m in models],
        extras)
    return EvalPlan(key=keys.key(spec), spec=spec, experiment=experiment, test_key=test_key, manifest=manifest,
                    cache_dir=cache_dir, backbone=backbone, classes=classes, models=models, device=device,
                    context=context or {}, retrieval=retrieval, embedding_map=embedding_map)


def _ckpt_id(m: ModelToEvaluate) -> str | None:
    return m.checkpoint.parent.name if m.checkpoint else None  # finetune/<key>/best.pt: the key says it all


def is_stored(plan: EvalPlan) -> bool:
    return plan.files.read_result() is not None


def evaluate(plan: EvalPlan) -> EvalResult:
    """Score every model on the test split, write the report and the registry rows; reuse a finished one."""
    started = time.perf_counter()
    saved = plan.files.read_result()
    if saved is not None:
        return EvalResult.model_validate({**saved, "report": plan.files.report_md, "cache_hit": True, "seconds": 0.0})
    plan.files.write_spec(plan.spec)
    reports = ranked(score_models(plan))
    found = retrieval(plan)
    drawn = embedding_map(plan)
    paths = write_report(plan, reports, seconds=time.perf_counter() - started, retrieval=found, embedding_map=drawn)
    registry.append(plan.cache_dir, registry_rows(plan, reports, paths["json"], found))
    result = EvalResult(key=plan.key, models=reports, report=paths["md"], cache_hit=False, retrieval=found,
                        seconds=time.perf_counter() - started)
    movable = result.model_copy(update={"report": Path(plan.files.report_md.name)})  # relative: the cache can move
    plan.files.write_result(movable.model_dump_json(exclude={"cache_hit", "seconds"}))  # last: marks it done
    return result


def score_models(plan: EvalPlan) -> list[ModelReport]:
    """Metrics of every model on the test split; few-shot seeds averaged per (name, shot)."""
    n_classes = len(plan.classes)
    per_fit: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    kinds: dict[tuple[str, str, str], tuple[str, str]] = {}
    seconds: dict[tuple[str, str, str], float] = {}
    picked: dict[tuple[str, str, str], list[tuple[float, str]]] = {}
    for m in plan.models:
        if m.head_key:
            metrics = _head_metrics(plan, m)
        else:
            scores, y = _finetuned_scores(plan, m)
            metrics = classification_metrics(y, scores, softmax(scores.astype(np.float64)), n_classes)
        group = (m.name, str(m.shot), m.layer)
        per_fit.setdefault(group, []).append(metrics)
        picked.setdefault(group, []).append(_validation(plan, m))
        kinds[group] = (m.kind, m.shot)
        seconds[group] = seconds.get(group, 0.0) + m.train_seconds
    images = _test_images(plan)
    return [
        ModelReport(name=name, kind=kinds[(name, shot, layer)][0], layer=layer, shot=kinds[(name, shot, layer)][1],
                    seeds=len(fits), metrics={**_with_interval(_average(fits), fits), "test_images": images},
                    train_seconds=seconds[(name, shot, layer)],
                    val_accuracy=float(np.mean([v for v, _ in picked[(name, shot, layer)]])),
                    artifacts=[a for _, a in sorted(picked[(name, shot, layer)], key=lambda p: -p[0])])
        for (name, shot, layer), fits in per_fit.items()
    ]


def _validation(plan: EvalPlan, m: ModelToEvaluate) -> tuple[float, str]:
    """A model's validation top-1 as its stage recorded it, and its artifact key (a head's, a fine-tuning run's)."""
    if m.head_key:
        return float(read_meta(plan.cache_dir, m.head_key)["val_accuracy"]), m.head_key
    done = checkpoints.RunFiles(m.checkpoint.parent).read_result() or {}
    return float(done.get("best_val_accuracy", float("nan"))), m.checkpoint.parent.name


def _test_images(plan: EvalPlan) -> str:
    """A fingerprint of the test images, in row order: two evaluations with the same one scored the same images,
    so their difference may take a paired interval (tasks.report.gain)."""
    return keys.fingerprint({"test_images": FeatureStore(plan.cache_dir).paths(plan.test_key)})


def _with_interval(metrics: dict[str, Any], fits: list[dict[str, Any]]) -> dict[str, Any]:
    """``hits``: per image, how many seeds got it right; ``top1_ci``: top-1's 95% bootstrap interval over test
    images (tasks.intervals)."""
    hits = sum(unpack_hits(f["hits"]) for f in fits)
    return {**metrics, "hits": pack_hits(hits), "top1_ci": list(top1_interval(hits, len(fits)))}


def _head_metrics(plan: EvalPlan, m: ModelToEvaluate) -> dict[str, Any]:
    """One head fit's metrics on the test features, remembered by (test features, fit) key: a rerun after one
    head changed scores only that head."""
    remembered, key = Records(CacheLayout(plan.cache_dir).metrics), keys.key(keys.metrics_spec(plan.test_key, m.head_key))
    if (metrics := remembered.read(key)) is not None:
        return metrics
    X, y = load_split(plan.cache_dir, plan.test_key, m.layer)
    head = load_head(plan.cache_dir, m.head_key)
    metrics = classification_metrics(y, head.class_scores(X), head.predict_proba(X) if head.has_proba else None,
                                      len(plan.classes))
    remembered.write(key, metrics)
    return metrics


def _average(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of scalar metrics over few-shot seeds (std alongside); lists from the first seed (``hits``: summed
    over seeds by :func:`_with_interval`)."""
    if len(fits) == 1:
        return fits[0]
    out = dict(fits[0])
    for name, value in fits[0].items():
        if isinstance(value, float):
            values = [f[name] for f in fits]
            out[name], out[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    if fits[0].get("nll_zero") is not None:  # a count per fit: its mean over the seeds
        out["nll_zero"] = float(np.mean([f["nll_zero"] for f in fits]))
    return out


def _finetuned_scores(plan: EvalPlan, m: ModelToEvaluate) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from tasks.backbones.models import load_model

    manifest = Manifest.load(plan.manifest)
    items = manifest.splits["test"]
    model = load_model(plan.backbone, num_classes=len(plan.classes))
    try:
        state = checkpoints.load(m.checkpoint)
    except checkpoints.CorruptCheckpoint as exc:
        checkpoints.RunFiles(m.checkpoint.parent).discard(str(exc))
        raise checkpoints.CorruptCheckpoint(f"{exc}; set aside: the next run fine-tunes it again") from None
    model.load_state_dict(state["model"])
    device = pick_device(plan.device)
    model.eval().to(device)
    pre = plan.backbone.preprocess
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), 64):
            x = torch.stack([pre(manifest.image(p)) for p, _ in items[start : start + 64]]).to(device)
            out.append(model(pre.normalize(x)).float().cpu().numpy())
    # skipped images are absent from the test feature file: score the same rows the heads see
    keep = set(FeatureStore(plan.cache_dir).paths(plan.test_key))
    rows = [i for i, (p, _) in enumerate(items) if p in keep]
    return np.concatenate(out)[rows], np.array([items[i][1] for i in rows])


def retrieval(plan: EvalPlan) -> dict[str, Any] | None:
    """The retrieval metrics of the plan's settings, remembered by (queries, gallery, settings, index) key: an
    evaluation that changed only a head does not search again."""
    from tasks.heads.stage import memory_budget
    from tasks.retrieval import Rows, retrieval_metrics

    wanted = plan.retrieval
    if not wanted:
        return None
    cfg = RetrievalConfig.model_validate(wanted["settings"])
    spec = keys.retrieval_spec(wanted["queries"], wanted["gallery"], wanted["settings"], wanted.get("index"))
    remembered, key = Records(CacheLayout(plan.cache_dir).metrics), keys.key(spec)
    if (found := remembered.read(key)) is not None:
        return found
    started = time.perf_counter()
    store = FeatureStore(plan.cache_dir)
    queries = Rows.stored(store.rows(wanted["queries"], cfg.layer), cfg.chunk_size)
    if wanted.get("index"):
        from tasks.index import indexed_retrieval

        found = indexed_retrieval(plan.cache_dir, wanted["index"], queries, cfg)  # builds the index if missing
    else:
        gallery = Rows.stored(store.rows(wanted["gallery"], cfg.layer), cfg.chunk_size) if wanted["gallery"] else None
        found = retrieval_metrics(queries, gallery, cfg.k, cfg.metric, memory_bytes=memory_budget())
    found = {**found, "layer": cfg.layer, "index": "faiss" if wanted.get("index") else "exact",
             "seconds": time.perf_counter() - started}
    remembered.write(key, found)
    return found


def embedding_map(plan: EvalPlan) -> dict[str, Any] | None:
    """The report's map of the embedding space (``embedding_map.png``), or None when the config turned it off."""
    from tasks.embedding_map import draw, sample

    wanted = plan.embedding_map
    if not wanted:
        return None
    cfg = MapConfig.model_validate(wanted["settings"])
    path, layout = plan.files.plot("embedding_map"), CacheLayout(plan.cache_dir)
    key = keys.key({"kind": "embedding_map", "version": keys.CODE_VERSIONS["evaluate"], **wanted,
                    "title": plan.experiment})
    drawn, remembered = layout.embedding_map(key), Records(layout.metrics)
    info = remembered.read(key)
    if info is None or not drawn.is_file():  # drawn once per features and settings: a head change reuses it
        store, splits = FeatureStore(plan.cache_dir), {}
        for split, features in wanted["splits"].items():
            rows = store.rows(features, cfg.layer)
            index = sample(rows.rows, cfg.points)
            splits[split] = (rows.take(index), rows.labels[index])
        drawn.parent.mkdir(parents=True, exist_ok=True)
        tmp = drawn.with_name(f"{drawn.stem}.tmp-{os.getpid()}.png")
        info = draw(tmp, splits, plan.classes, cfg.method, f"{plan.experiment}, layer {cfg.layer}")
        os.replace(tmp, drawn)
        remembered.write(key, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(drawn, path)
    return {**info, "file": path.name}
