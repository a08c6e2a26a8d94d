"""Label issues: out-of-fold probabilities of two cheap models on the training features (a logistic probe
and the vote of each image's nearest other training images), averaged, then Confident Learning on them; for
val/test the vote of the nearest training images.

The flags are cleanlab 2.x's ``find_label_issues(filter_by="low_self_confidence")``
(:func:`low_self_confidence`): as many rows as Confident Learning counts off the confident joint's diagonal,
those with the lowest self-confidence. On the planted set (benchmarks/quality.py) that ranking held more of
the flips at the top than the confident-joint rows themselves, and the average of the two models more than
either alone (docs/evaluation.md#data-quality has the figures).

:func:`confident_learning` is Confident Learning's "confident joint off-diagonals" rule (Northcutt et al.,
JAIR 2021), written as cleanlab 2.x's ``find_label_issues(filter_by="confident_learning")`` computes it (per
class threshold: the mean self-confidence of the images given that class; an image counts for the class it is
confidently predicted as, the most probable one when several pass; an issue when that is not its label and the
probe does not predict its label), so ``tests/test_quality.py`` can check it against cleanlab on the same
probabilities: the same set of flagged rows.
"""
from __future__ import annotations

import numpy as np

FUZZ = 1e-6  # cleanlab's floating-point margin for "at or above a threshold" and "predicts the given label"
THRESHOLD_FLOOR = 2 * FUZZ


#: the probe's inverse regularisation on centred unit-length features (chosen on the planted set with the
#: kNN vote beside it: 0.1 to 100 gave top-flag precision within 0.05 of each other)
PROBE_C = 10.0
PRIOR_WEIGHT = 1.0  # pseudo-votes of the class prior in the kNN probabilities (no zero probability)


def out_of_fold(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int, C: float = PROBE_C) -> np.ndarray:
    """Each training image's class probabilities from a logistic probe that did not see it (stratified folds;
    features centred on each fold's training mean and scaled to unit length, as the searches compare them). A
    class with fewer images than folds is dealt round-robin so every fold's probe sees the classes it can. A
    fold whose training part holds one class only (a class with a single image, on tiny data) fits no probe:
    its rows are NaN, and the caller scores them by the vote alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, max(2, counts[counts > 0].min())))
    proba = np.zeros((len(y), n_classes), dtype=np.float64)
    for fit, held in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
        mean = X[fit].mean(axis=0)

        def unit(x: np.ndarray) -> np.ndarray:
            x = x - mean
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

        if len(np.unique(y[fit])) < 2:
            proba[held] = np.nan
            continue
        model = LogisticRegression(C=C, max_iter=1000, tol=1e-4).fit(unit(X[fit]), y[fit])
        proba[np.ix_(held, model.classes_)] = model.predict_proba(unit(X[held]))
    return proba


BLOCK = 8192  # rows of a probability matrix made dense at once (8192 x 1,000 classes: 64 MB)


class VoteProbabilities:
    """Class probabilities from each row's nearest other training rows (itself left out, so out of sample):
    their votes plus ``prior_weight`` votes spread as the training labels are. Kept as the votes (rows x k),
    made dense a block of rows at a time: 1.28M rows x 1,000 classes would be 10 GB."""

    def __init__(self, neighbour_labels: np.ndarray, labels: np.ndarray, n_classes: int,
                 prior_weight: float = PRIOR_WEIGHT):
        self.neighbours, self.n_classes, self.weight = neighbour_labels, n_classes, prior_weight
        self.prior = np.bincount(labels, minlength=n_classes) / max(len(labels), 1)
        self.shape = (len(neighbour_labels), n_classes)

    def rows(self, index: np.ndarray | slice) -> np.ndarray:
        votes, found = _votes(self.neighbours[index], self.n_classes)
        return (votes + self.weight * self.prior) / (found + self.weight)[:, None]

    def given(self, labels: np.ndarray) -> np.ndarray:
        """Each row's probability of its own label, without a dense matrix."""
        valid = self.neighbours >= 0
        same = ((self.neighbours == labels[:, None]) & valid).sum(axis=1)
        return (same + self.weight * self.prior[labels]) / (valid.sum(axis=1) + self.weight)


def _votes(neighbour_labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the neighbours of each class and how many neighbours there are (-1: none found there)."""
    n, k = neighbour_labels.shape
    valid = neighbour_labels >= 0
    votes = np.zeros((n, n_classes), dtype=np.float64)
    np.add.at(votes, (np.repeat(np.arange(n), k)[valid.ravel()], neighbour_labels[valid]), 1.0)
    return votes, valid.sum(axis=1).astype(np.float64)


def _blocks(proba):
    """``(first row, dense block)`` of a matrix or :class:`VoteProbabilities`, :data:`BLOCK` rows at a time."""
    for start in range(0, proba.shape[0], BLOCK):
        rows = slice(start, start + BLOCK)
        yield start, (proba[rows] if isinstance(proba, np.ndarray) else proba.rows(rows))


def low_self_confidence(labels: np.ndarray, proba) -> np.ndarray:
    """The flagged rows, most likely wrong first: as many as :func:`confident_learning` flags, those with the
    lowest :func:`self_confidence` (cleanlab's ``filter_by="low_self_confidence"``)."""
    count = int(confident_learning(labels, proba).sum())
    return np.argsort(self_confidence(labels, proba), kind="stable")[:count]


def confident_learning(labels: np.ndarray, proba) -> np.ndarray:
    """Rows whose given label is confidently contradicted (a boolean mask over the rows); ``proba`` a matrix
    or :class:`VoteProbabilities`, read a block of rows at a time."""
    labels = np.asarray(labels)
    n, k = proba.shape
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=self_confidence(labels, proba), minlength=k)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), 2.0)  # the mean self-confidence per class
    thresholds = np.maximum(thresholds, THRESHOLD_FLOOR)
    out = np.zeros(n, dtype=bool)
    for start, block in _blocks(proba):
        y = labels[start : start + len(block)]
        confident = block >= thresholds - FUZZ
        several = confident.sum(axis=1) > 1
        guess = np.where(several, block.argmax(axis=1), confident.argmax(axis=1))
        issue = confident.any(axis=1) & (guess != y)
        block = block.copy()
        block[np.arange(len(y)), y] += FUZZ
        out[start : start + len(y)] = issue & (block.argmax(axis=1) != y)
    return out


def self_confidence(labels: np.ndarray, proba) -> np.ndarray:
    """The probability the probe gives each row's own label: the lower, the likelier a wrong label."""
    if isinstance(proba, np.ndarray):
        return proba[np.arange(len(labels)), labels]
    return proba.given(np.asarray(labels))


def predicted(proba, rows: np.ndarray) -> np.ndarray:
    """The most probable class of each of ``rows``."""
    block = proba[rows] if isinstance(proba, np.ndarray) else proba.rows(rows)
    return block.argmax(axis=1)


def vote_disagreement(neighbour_labels: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the share of its nearest training images that carry another label, and their majority
    label (ties: the lower class), a block of rows at a time."""
    against, majority = np.empty(len(labels)), np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(labels), BLOCK):
        rows = slice(start, start + BLOCK)
        votes, found = _votes(neighbour_labels[rows], n_classes)
        majority[rows] = votes.argmax(axis=1)
        against[rows] = 1.0 - votes[np.arange(len(votes)), labels[rows]] / np.maximum(found, 1)
    return against, majority
