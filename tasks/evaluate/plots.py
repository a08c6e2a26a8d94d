"""The report's plots (matplotlib, Agg): confusion matrix, top confusions, reliability diagram and the
few-shot curve, each saved as a PNG beside the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from storage.records import ReportFiles
from tasks.evaluate.plan import ModelReport


def few_shot_curve(ranked: list[ModelReport]) -> dict[str, dict[Any, float]]:
    curve: dict[str, dict[Any, float]] = {}
    for r in ranked:
        curve.setdefault(r.name, {})[r.shot] = r.metrics["top1"]
    return {name: points for name, points in curve.items() if len(points) > 1}


def _few_shot_spread(ranked: list[ModelReport]) -> dict[str, dict[Any, float]]:
    """The seeds' standard deviation of test top-1 per model and shot count (0 for a single fit)."""
    spread: dict[str, dict[Any, float]] = {}
    for r in ranked:
        spread.setdefault(r.name, {})[r.shot] = r.metrics.get("top1_std", 0.0)
    return spread


def draw_plots(files: ReportFiles, ranked: list[ModelReport], classes: list[str]) -> dict[str, Path]:
    """The confusion matrix of the best model, a reliability diagram, the few-shot curve (where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    if not ranked:
        return {}
    plots = {"confusion_matrix": _confusion_plot(files.plot("confusion_matrix"), ranked[0], classes)}
    calibrated = next((r for r in ranked if r.metrics["reliability"]), None)
    if calibrated:
        plots["reliability"] = _reliability_plot(files.plot("reliability"), calibrated)
    curve = few_shot_curve(ranked)
    if curve:
        plots["few_shot"] = _few_shot_plot(files.plot("few_shot"), curve, _few_shot_spread(ranked))
    return plots


MATRIX_PLOT_MAX_CLASSES = 30  # above: a bar chart of the top confusions, readable at 1,000 classes


def _confusion_plot(path: Path, best: ModelReport, classes: list[str]) -> Path:
    import matplotlib.pyplot as plt

    if best.metrics.get("confusion_matrix") is None or len(best.metrics["confusion_matrix"]) > MATRIX_PLOT_MAX_CLASSES:
        return _top_confusions_plot(path, best, classes)
    cm = np.asarray(best.metrics["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set(title=f"confusion matrix: {best.name} ({best.shot})", xlabel="predicted", ylabel="true",
           xticks=range(len(cm)), yticks=range(len(cm)))
    if len(cm) <= 20:
        if classes:
            ax.set_xticklabels(classes, rotation=90)
            ax.set_yticklabels(classes)
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    return _save(fig, path)


def _top_confusions_plot(path: Path, best: ModelReport, classes: list[str]) -> Path:
    import matplotlib.pyplot as plt

    cells = best.metrics.get("top_confusions") or []
    name = (lambda i: classes[i] if i < len(classes) else str(i))  # noqa: E731
    labels = [f"{name(c['true'])} → {name(c['predicted'])}" for c in cells][::-1]
    fig, ax = plt.subplots(figsize=(6, 0.3 * max(len(cells), 4) + 1))
    ax.barh(range(len(cells)), [c["count"] for c in cells][::-1], color="tab:blue")
    ax.set_yticks(range(len(cells)), labels, fontsize=7)
    ax.set(title=f"top confusions: {best.name} ({best.shot}), {len(classes)} classes",
           xlabel="test images (true → predicted)")
    return _save(fig, path)


def _reliability_plot(path: Path, model: ModelReport) -> Path:
    import matplotlib.pyplot as plt

    bins = [b for b in model.metrics["reliability"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=bins[0]["upper"] - bins[0]["lower"],
           alpha=0.7, edgecolor="black", label="accuracy per confidence bin")
    ax.set(title=f"reliability: {model.name} (ECE {model.metrics['ece']:.3f})", xlabel="confidence",
           ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _save(fig, path)


def _few_shot_plot(path: Path, curve: dict[str, dict[Any, float]], spread: dict[str, dict[Any, float]]) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in curve.items():
        shots = sorted((s for s in points if s != "all"))
        xs = [*shots, *(["all"] if "all" in points else [])]
        ax.errorbar(range(len(xs)), [points[s] for s in xs], yerr=[spread[name].get(s, 0.0) for s in xs],
                    marker="o", capsize=3, label=name)
        ax.set_xticks(range(len(xs)), [str(s) for s in xs])
    ax.set(title="few-shot curve (test; bars: std over seeds)", xlabel="labelled images per class",
           ylabel="top-1 accuracy")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
