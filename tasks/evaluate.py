"""Evaluation on the test split: metrics, plots and reports for every head and the fine-tuned model.

Metrics come from scikit-learn where it has them (accuracy, top-k, balanced
accuracy, macro-F1, confusion matrix, log loss); expected calibration error is
the standard 15-bin estimate over the top-class confidence. Few-shot heads are
evaluated per (shot, seed) and averaged per shot into a label-efficiency curve.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss, top_k_accuracy_score,
)

from storage.features import FeatureStore
from storage.keys import fingerprint
from tasks.backbones import BackboneSpec, load_model
from tasks.data import Manifest, load_rgb
from tasks.devices import pick_device
from tasks.head_stage import load_head, load_split
from tasks.stage import StageResult

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


def classification_metrics(y: np.ndarray, scores: np.ndarray, proba: np.ndarray | None, n_classes: int) -> dict[str, Any]:
    """Every metric of one model on one test set; NLL and ECE need probabilities (else None)."""
    labels = np.arange(n_classes)
    pred = scores.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    per_class = np.divide(np.diag(cm), cm.sum(axis=1), out=np.zeros(n_classes), where=cm.sum(axis=1) > 0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "top1": float(accuracy_score(y, pred)),
        "top5": float(top_k_accuracy_score(y, scores, k=5, labels=labels)) if n_classes >= 5 else None,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": cm.tolist(),
        "nll": None, "ece": None, "reliability": None,
    }
    if proba is not None:
        out["nll"] = float(log_loss(y, np.clip(proba, 1e-12, 1.0), labels=labels))
        out["ece"], out["reliability"] = expected_calibration_error(y, proba)
    return out


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


class EvalPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    test_key: str
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    classes: list[str]
    models: list[ModelToEvaluate]
    device: str = "auto"


class ModelReport(BaseModel):
    name: str
    kind: str
    layer: str
    shot: int | str
    seeds: int
    metrics: dict[str, Any]
    train_seconds: float = 0.0  # summed over seeds


class EvalResult(StageResult):
    key: str
    models: list[ModelReport]


def plan_evaluation(test_key: str, manifest: Path, cache_dir: Path, backbone: BackboneSpec, classes: list[str],
                    models: list[ModelToEvaluate], device: str = "auto") -> EvalPlan:
    key = fingerprint({"kind": "evaluate", "test": test_key, "models": [
        m.model_dump(mode="json", exclude={"checkpoint", "train_seconds"}) | {"ckpt": _ckpt_id(m)} for m in models]})
    return EvalPlan(key=key, test_key=test_key, manifest=manifest, cache_dir=cache_dir, backbone=backbone,
                    classes=classes, models=models, device=device)


def _ckpt_id(m: ModelToEvaluate) -> str | None:
    return m.checkpoint.parent.name if m.checkpoint else None  # finetune/<key>/best.pt: the key says it all


def evaluate(plan: EvalPlan) -> EvalResult:
    """Metrics of every model on the test split; few-shot seeds averaged per (name, shot)."""
    started = time.perf_counter()
    n_classes = len(plan.classes)
    per_fit: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    kinds: dict[tuple[str, str, str], tuple[str, str]] = {}
    seconds: dict[tuple[str, str, str], float] = {}
    for m in plan.models:
        if m.head_key:
            X, y = load_split(plan.cache_dir, plan.test_key, m.layer)
            head = load_head(plan.cache_dir, m.head_key)
            scores = head.class_scores(X)
            proba = head.predict_proba(X) if head.has_proba else None
        else:
            scores, y = _finetuned_scores(plan, m)
            proba = torch.softmax(torch.as_tensor(scores), dim=1).numpy()
        group = (m.name, str(m.shot), m.layer)
        per_fit.setdefault(group, []).append(classification_metrics(y, scores, proba, n_classes))
        kinds[group] = (m.kind, m.shot)
        seconds[group] = seconds.get(group, 0.0) + m.train_seconds
    reports = [
        ModelReport(name=name, kind=kinds[(name, shot, layer)][0], layer=layer, shot=kinds[(name, shot, layer)][1],
                    seeds=len(fits), metrics=_average(fits), train_seconds=seconds[(name, shot, layer)])
        for (name, shot, layer), fits in per_fit.items()
    ]
    return EvalResult(key=plan.key, models=reports, cache_hit=False, seconds=time.perf_counter() - started)


def _average(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of scalar metrics over few-shot seeds (std alongside); lists from the first seed."""
    if len(fits) == 1:
        return fits[0]
    out = dict(fits[0])
    for name, value in fits[0].items():
        if isinstance(value, float):
            values = [f[name] for f in fits]
            out[name], out[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def _finetuned_scores(plan: EvalPlan, m: ModelToEvaluate) -> tuple[np.ndarray, np.ndarray]:
    manifest = Manifest.load(plan.manifest)
    items = manifest.splits["test"]
    model = load_model(plan.backbone, num_classes=len(plan.classes))
    model.load_state_dict(torch.load(m.checkpoint, map_location="cpu", weights_only=True)["model"])
    device = pick_device(plan.device)
    model.eval().to(device)
    pre = plan.backbone.preprocess
    out = []
    with torch.inference_mode():
        for start in range(0, len(items), 64):
            x = torch.stack([pre(load_rgb(manifest.root / p)) for p, _ in items[start : start + 64]]).to(device)
            out.append(model(pre.normalize(x)).float().cpu().numpy())
    # skipped images are absent from the test feature file: score the same rows the heads see
    keep = set(FeatureStore(plan.cache_dir).paths(plan.test_key))
    rows = [i for i, (p, _) in enumerate(items) if p in keep]
    return np.concatenate(out)[rows], np.array([items[i][1] for i in rows])


def write_report(folder: Path, result: EvalResult, context: dict[str, Any]) -> dict[str, Path]:
    """report.json, report.md and PNG plots in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    ranked = sorted(result.models, key=lambda r: -r.metrics["top1"])
    payload = {**context, "models": [r.model_dump() for r in ranked]}
    (folder / "report.json").write_text(json.dumps(payload, indent=1, default=str))
    plots = _plots(folder, ranked, context.get("classes", []))
    (folder / "report.md").write_text(report_markdown(ranked, context, plots))
    return {"json": folder / "report.json", "md": folder / "report.md", **plots}


def summary_rows(ranked: list[ModelReport]) -> list[dict[str, Any]]:
    fmt = lambda v: "" if v is None else round(v, 4)  # noqa: E731
    return [
        {"model": r.name, "kind": r.kind, "shots": r.shot, "top1": fmt(r.metrics["top1"]), "top5": fmt(r.metrics["top5"]),
         "balanced_acc": fmt(r.metrics["balanced_accuracy"]), "macro_f1": fmt(r.metrics["macro_f1"]),
         "nll": fmt(r.metrics["nll"]), "ece": fmt(r.metrics["ece"]), "train_s": round(r.train_seconds, 2)}
        for r in ranked
    ]


def report_markdown(ranked: list[ModelReport], context: dict[str, Any], plots: dict[str, Path]) -> str:
    rows = summary_rows(ranked)
    header = list(rows[0]) if rows else []
    lines = [f"# {context.get('experiment', 'experiment')}: test results", "",
             f"Backbone `{context.get('backbone')}` (weights `{context.get('weights')}`), "
             f"{ranked[0].metrics['n'] if ranked else 0} test images. Models ranked by top-1 accuracy.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    curve = _few_shot_curve(ranked)
    if curve:
        shots = sorted({s for points in curve.values() for s in points}, key=lambda s: (s == "all", s if s != "all" else 0))
        lines += ["", "## Few-shot curve (test top-1, mean over seeds)", "",
                  "| model | " + " | ".join(str(s) for s in shots) + " |", "|---|" + "---|" * len(shots)]
        lines += [f"| {name} | " + " | ".join(f"{points[s]:.3f}" if s in points else "" for s in shots) + " |"
                  for name, points in curve.items()]
    lines += ["", *(f"![{name}]({path.name})" for name, path in plots.items())]
    timings = context.get("stages", {})
    if timings:
        lines += ["", "## Stages", "", "| stage | seconds | cache |", "|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.1f} | {'hit' if v['cache_hit'] else 'computed'} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def _few_shot_curve(ranked: list[ModelReport]) -> dict[str, dict[Any, float]]:
    curve: dict[str, dict[Any, float]] = {}
    for r in ranked:
        curve.setdefault(r.name, {})[r.shot] = r.metrics["top1"]
    return {name: points for name, points in curve.items() if len(points) > 1}


def _plots(folder: Path, ranked: list[ModelReport], classes: list[str]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    if not ranked:
        return plots
    best = ranked[0]
    cm = np.asarray(best.metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set(title=f"confusion matrix: {best.name} ({best.shot})", xlabel="predicted", ylabel="true",
           xticks=range(len(cm)), yticks=range(len(cm)))
    if classes and len(classes) <= 20:
        ax.set_xticklabels(classes, rotation=90)
        ax.set_yticklabels(classes)
    for (i, j), v in np.ndenumerate(cm):
        if len(cm) <= 20:
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    plots["confusion_matrix"] = _save(fig, folder / "confusion_matrix.png")
    calibrated = next((r for r in ranked if r.metrics["reliability"]), None)
    if calibrated:
        bins = [b for b in calibrated.metrics["reliability"] if b["count"]]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS, alpha=0.7,
               edgecolor="black", label="accuracy per confidence bin")
        ax.set(title=f"reliability: {calibrated.name} (ECE {calibrated.metrics['ece']:.3f})", xlabel="confidence",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
        plots["reliability"] = _save(fig, folder / "reliability.png")
    curve = _few_shot_curve(ranked)
    if curve:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, points in curve.items():
            shots = sorted((s for s in points if s != "all"))
            xs = [*shots, *(["all"] if "all" in points else [])]
            ax.plot(range(len(xs)), [points[s] for s in xs], marker="o", label=name)
            ax.set_xticks(range(len(xs)), [str(s) for s in xs])
        ax.set(title="few-shot curve (test)", xlabel="labelled images per class", ylabel="top-1 accuracy")
        ax.legend()
        plots["few_shot"] = _save(fig, folder / "few_shot.png")
    return plots


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
