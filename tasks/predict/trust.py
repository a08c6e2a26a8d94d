"""How far to trust a prediction: temperature scaling, split-conformal prediction sets, an OOD score.

All fitted on the experiment's own splits, never on the images being scored:

* **temperature** (Guo et al., 2017): one scalar ``T`` dividing the log-probabilities, fitted by minimising the
  negative log-likelihood on val (bounded search over ``log T``); top-1 never changes;
* **conformal sets** (split conformal on val, the calibration split): ``lac`` (least ambiguous set-valued
  classifier, Sadinle et al. 2019: score ``1 - p_y``) or ``aps`` (adaptive prediction sets, Romano et al.
  2020, without randomisation: the mass of the labels ranked up to and including ``y``; a set holds the labels
  whose score is within the threshold, so, like LAC's, it may be empty). The threshold is the
  ``ceil((n + 1)(1 - alpha)) / n`` empirical quantile of the calibration scores, which guarantees coverage of at
  least ``1 - alpha`` on exchangeable data; with too few calibration rows for that (``n < 1/alpha - 1``) it is
  refused, naming both numbers;
* **OOD score**: one minus the cosine similarity to the nearest training image's features (kNN, k=1, Sun et
  al. 2022 use the same on normalised features); flagged above the threshold that 95% of val passes.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np

Method = Literal["lac", "aps", "raps"]
NO_PENALTY = (0.0, 0)  # RAPS's (lambda, k_reg): none for lac and aps
EPS = 1e-12


def log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, EPS, 1.0))


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with temperature ``T``: softmax(log p / T), in float64."""
    z = log_probs(probs.astype(np.float64)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(log_probs(probs[np.arange(len(labels)), labels])))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins (as torchmetrics' ``l1``)."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(float((pred[inside] == labels[inside]).mean()) - float(conf[inside].mean()))
    return total


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising val NLL, searched over ``log T`` in [-3, 3] (scipy's bounded Brent)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda t: nll(scaled(probs, math.exp(t)), labels), bounds=(-3.0, 3.0), method="bounded",
                            options={"xatol": 1e-4})
    return float(math.exp(found.x))


def needed_rows(coverage: float) -> int:
    """The fewest calibration rows with which split conformal can promise ``coverage``."""
    alpha = 1.0 - coverage
    return max(1, math.ceil((1 - alpha) / alpha - 1e-9))


def _ranked_mass(probs: np.ndarray, penalty: tuple[float, int]) -> tuple[np.ndarray, np.ndarray]:
    """The classes by falling probability and each one's score there: the mass ranked up to and including it
    (APS), plus RAPS's ``lambda * max(0, rank - k_reg)`` (rank from 1) when ``penalty`` has a lambda."""
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    lam, k_reg = penalty
    if lam:
        cumulative = cumulative + lam * np.maximum(0, np.arange(1, probs.shape[1] + 1) - k_reg)
    return order, cumulative


def scores(probs: np.ndarray, labels: np.ndarray, method: Method, penalty: tuple[float, int] = NO_PENALTY
           ) -> np.ndarray:
    """Each calibration row's nonconformity score (higher: the true label looks less likely)."""
    rows = np.arange(len(labels))
    if method == "lac":
        return 1.0 - probs[rows, labels]
    order, cumulative = _ranked_mass(probs, penalty if method == "raps" else NO_PENALTY)
    rank = np.argmax(order == labels[:, None], axis=1)
    return cumulative[rows, rank]


def threshold(probs: np.ndarray, labels: np.ndarray, coverage: float, method: Method,
              penalty: tuple[float, int] = NO_PENALTY) -> float:
    """The split-conformal threshold on the calibration rows; a ValueError when there are too few of them."""
    n, alpha = len(labels), 1.0 - coverage
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        raise ValueError(f"predict.coverage {coverage}: the calibration split (val) has {n} labelled rows; "
                         f"split conformal needs at least {needed_rows(coverage)} for that coverage (add val images "
                         "with data.val_fraction, or lower predict.coverage)")
    return float(np.sort(scores(probs, labels, method, penalty))[rank - 1])


def sets(probs: np.ndarray, q: float, method: Method, penalty: tuple[float, int] = NO_PENALTY) -> np.ndarray:
    """Each row's prediction set as a boolean mask over the classes."""
    if method == "lac":
        return (1.0 - probs) <= q + 1e-12
    order, cumulative = _ranked_mass(probs, penalty if method == "raps" else NO_PENALTY)
    # a label is in when its score (the mass ranked up to and including it) is within q: the score's own
    # definition, so the coverage guarantee holds as it is (MAPIE's include_last_label=False)
    mask = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(mask, order, cumulative <= q + 1e-12, axis=1)
    return mask


def unit_rows(features: np.ndarray) -> np.ndarray:
    x = features.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)


def ood_scores(queries: np.ndarray, bank: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """One minus the largest cosine similarity of each query to the bank's rows (both unit rows), in chunks."""
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ bank.T
        out[start:start + chunk] = 1.0 - sims.max(axis=1)
    return out


def ood_figures(inside: np.ndarray, outside: np.ndarray, passing: float = 0.95) -> dict[str, float]:
    """How well the OOD score separates in-distribution images (``inside``: the test split) from an OOD set:
    AUROC (OOD as the positive class, higher score = more OOD) and FPR95, the share of OOD images that pass
    the threshold at which 95% of the in-distribution images pass (lower is better)."""
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    cut = float(np.quantile(inside, passing, method="higher"))
    return {"auroc": float(roc_auc_score(truth, np.r_[inside, outside])), "fpr95": float((outside <= cut).mean()),
            "ood_rows": float(len(outside))}
