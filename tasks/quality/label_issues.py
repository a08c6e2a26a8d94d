"""Label issues: out-of-fold probabilities of a cheap probe on the training features, Confident Learning on
them, and for val/test the vote of the nearest training images.

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


def out_of_fold(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int) -> np.ndarray:
    """Each training image's class probabilities from a logistic probe that did not see it (stratified folds;
    features standardised on each fold's training part). A class with fewer images than folds is dealt
    round-robin so every fold's probe sees the classes it can."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=n_classes)
    k = int(min(folds, max(2, counts[counts > 0].min())))
    proba = np.zeros((len(y), n_classes), dtype=np.float64)
    for fit, held in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
        mean, std = X[fit].mean(axis=0), X[fit].std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)
        model = LogisticRegression(C=1.0, max_iter=1000, tol=1e-4).fit((X[fit] - mean) / std, y[fit])
        proba[np.ix_(held, model.classes_)] = model.predict_proba((X[held] - mean) / std)
    return proba


def confident_learning(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Rows whose given label is confidently contradicted (a boolean mask over the rows)."""
    labels = np.asarray(labels)
    n, k = proba.shape
    present = np.bincount(labels, minlength=k) > 0
    thresholds = np.array([proba[labels == c, c].mean() if present[c] else 2.0 for c in range(k)])
    thresholds = np.maximum(thresholds, THRESHOLD_FLOOR)
    confident = proba >= thresholds - FUZZ
    several = confident.sum(axis=1) > 1
    guess = np.where(several, proba.argmax(axis=1), confident.argmax(axis=1))
    issue = confident.any(axis=1) & (guess != labels)
    given = proba.copy()
    given[np.arange(n), labels] += FUZZ
    return issue & (given.argmax(axis=1) != labels)


def self_confidence(labels: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """The probability the probe gives each row's own label: the lower, the likelier a wrong label."""
    return proba[np.arange(len(labels)), labels]


def vote_disagreement(neighbour_labels: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the share of its nearest training images that carry another label, and their majority
    label (ties: the lower class)."""
    votes = np.zeros((len(labels), n_classes), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(labels)), neighbour_labels.shape[1]), neighbour_labels.ravel()), 1)
    majority = votes.argmax(axis=1)
    against = 1.0 - votes[np.arange(len(labels)), labels] / max(neighbour_labels.shape[1], 1)
    return against, majority
