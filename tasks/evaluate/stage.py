"""Evaluation on the test split: metrics, plots and reports for every head and the fine-tuned model.

Metrics come from scikit-learn where it has them (accuracy, top-k, balanced
accuracy, macro-F1, confusion matrix, log loss); expected calibration error is
the standard 15-bin estimate over the top-class confidence. Few-shot heads are
evaluated per (shot, seed) and averaged per shot into a label-efficiency curve.
The stage writes the experiment's report (:mod:`tasks.evaluate.report`) and its rows in
the results registry once, when it computes; a finished evaluation is reused.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage import checkpoints, keys
from storage import results as registry
from storage.features import FeatureStore
from storage.head_store import read_meta
from storage.layout import CacheLayout
from storage.records import QualityFiles, Records, read_json
from tasks.data.manifest import Manifest
from tasks.evaluate.intervals import pack_hits, top1_interval, unpack_hits
from tasks.evaluate.metrics import classification_metrics
from tasks.evaluate.plan import EvalPlan, EvalResult, ModelReport, ModelToEvaluate
from tasks.evaluate.projection import MapConfig
from tasks.evaluate.report import ranked, registry_rows, write_report
from tasks.heads.stage import load_head, load_split
from tasks.index.retrieval import RetrievalConfig
from tasks.machine import pick_device
from tasks.softmax import softmax


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
    images, leaked = _test_images(plan), _leaked(plan)
    return [
        ModelReport(name=name, kind=kinds[(name, shot, layer)][0], layer=layer, shot=kinds[(name, shot, layer)][1],
                    seeds=len(fits), metrics={**_with_interval(_average(fits), fits), "test_images": images,
                                              **_without_leaks(fits, leaked)},
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
    so their difference may take a paired interval (tasks.evaluate.report.gain)."""
    return keys.fingerprint({"test_images": FeatureStore(plan.cache_dir).paths(plan.test_key)})


def _leaked(plan: EvalPlan) -> np.ndarray | None:
    """Which test rows the quality stage found leaked from train or val (a mask in row order), or None."""
    if plan.quality is None:
        return None
    found = read_json(QualityFiles(CacheLayout(plan.cache_dir).quality(plan.quality)).findings) or {}
    leaked = set(found.get("leaked_test", []))
    return np.array([p in leaked for p in FeatureStore(plan.cache_dir).paths(plan.test_key)], dtype=bool)


def _without_leaks(fits: list[dict[str, Any]], leaked: np.ndarray | None) -> dict[str, Any]:
    """Top-1 on the test images without a near-duplicate in train or val, and how many were left out."""
    if leaked is None:
        return {}
    hits, keep = sum(unpack_hits(f["hits"]) for f in fits), ~leaked
    top1 = float(hits[keep].sum() / (keep.sum() * len(fits))) if keep.any() else None
    return {"top1_without_leaks": top1, "leaked_test_images": int(leaked.sum())}


def _with_interval(metrics: dict[str, Any], fits: list[dict[str, Any]]) -> dict[str, Any]:
    """``hits``: per image, how many seeds got it right; ``top1_ci``: top-1's 95% bootstrap interval over test
    images (tasks.evaluate.intervals)."""
    hits = sum(unpack_hits(f["hits"]) for f in fits)
    return {**metrics, "hits": pack_hits(hits), "top1_ci": list(top1_interval(hits, len(fits)))}


def _head_metrics(plan: EvalPlan, m: ModelToEvaluate) -> dict[str, Any]:
    """One head fit's metrics on the test features, remembered by (test features, fit) key: a rerun after one
    head changed scores only that head."""
    remembered, key = Records(CacheLayout(plan.cache_dir).metrics), keys.key(keys.metrics_spec(plan.test_key, m.head_key))
    excluded = read_meta(plan.cache_dir, m.head_key).get("excluded_rows")
    cleaned = {} if excluded is None else {"excluded_rows": excluded}  # training rows quality.exclude left out
    if (metrics := remembered.read(key)) is not None:
        return {**metrics, **cleaned}
    X, y = load_split(plan.cache_dir, plan.test_key, m.layer)
    head = load_head(plan.cache_dir, m.head_key)
    metrics = classification_metrics(y, head.class_scores(X), head.predict_proba(X) if head.has_proba else None,
                                      len(plan.classes))
    remembered.write(key, metrics)
    return {**metrics, **cleaned}


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
    from tasks.machine import memory_budget
    from tasks.index.retrieval import Rows, retrieval_metrics

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
        from tasks.index.stage import indexed_retrieval

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
    from tasks.evaluate.projection import draw, sample

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
