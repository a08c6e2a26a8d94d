"""Classification metrics of one model's test scores: accuracy, top-5, balanced accuracy, NLL (as
scikit-learn's ``log_loss``), expected calibration error and the top confusions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tasks.evaluate.intervals import pack_hits

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
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        top_k_accuracy_score,
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
        "hits": pack_hits(pred == y),  # per image: classified correctly (tasks.evaluate.intervals)
    }
    if proba is not None:
        out["nll"], out["nll_zero"] = log_loss(y, proba)
        out["ece"], out["reliability"] = expected_calibration_error(y, proba)
    return out
