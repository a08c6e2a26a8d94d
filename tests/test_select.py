"""Transferability scores against a straightforward reference and hand-checked cases."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.select import h_score, leep, logme, nce


def logme_reference(f: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 1e-3) -> float:
    """The same evidence maximisation with explicit matrices: A = alpha I + beta F^T F, inverted directly."""
    f = f.astype(np.float64)
    n, d = f.shape
    out = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            A = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(A, f.T @ y)
            gamma = d - alpha * np.trace(np.linalg.inv(A))
            alpha_de, beta_de = m @ m, ((y - f @ m) ** 2).sum()
            alpha, beta = gamma / (alpha_de + 1e-5), (n - gamma) / (beta_de + 1e-5)
            if abs(alpha / beta - lam) / lam < tol:
                break
        A = alpha * np.eye(d) + beta * f.T @ f
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.linalg.slogdet(A)[1]
                    - beta / 2 * (beta_de + 1e-5) - alpha / 2 * (alpha_de + 1e-5) - n / 2 * np.log(2 * np.pi))
        out.append(evidence / n)
    return float(np.mean(out))


@pytest.mark.parametrize(("n", "d", "classes", "seed"), [(50, 8, 3, 0), (200, 16, 5, 1), (30, 40, 2, 2)])
def test_logme_matches_the_reference(n, d, classes, seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    y = rng.integers(0, classes, n)
    assert logme(f, y) == pytest.approx(logme_reference(f, y), rel=1e-6, abs=1e-6)


def test_separable_features_outrank_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    separable = np.eye(4)[y] * 3 + rng.normal(0, 0.3, (200, 4))
    separable = np.hstack([separable, rng.normal(size=(200, 12))])
    noise = rng.normal(size=(200, 16))
    assert logme(separable, y) > logme(noise, y)
    assert h_score(separable, y) > h_score(noise, y)


def test_h_score_by_hand():
    y = np.array([0, 0, 1, 1])
    assert h_score(np.array([[0.0], [0.0], [2.0], [2.0]]), y) == pytest.approx(1.0)  # the means explain all variance
    assert h_score(np.array([[0.0], [2.0], [0.0], [2.0]]), y) == pytest.approx(0.0)  # they explain none


def test_nce_and_leep_by_hand():
    y = np.array([0, 0, 1, 1])
    assert nce(np.array([0, 0, 1, 1]), y) == pytest.approx(0.0)  # source predictions determine the label
    assert nce(np.array([0, 0, 0, 0]), y) == pytest.approx(-np.log(2))  # they say nothing
    assert nce(np.array([2, 2, 5, 5]), y) == pytest.approx(0.0)  # source classes need not match target ones
    assert leep(np.eye(2)[y], y) == pytest.approx(0.0)
    assert leep(np.full((4, 2), 0.5), y) == pytest.approx(np.log(0.5))
    # a soft case: theta = [[.9,.1],[.9,.1],[.2,.8],[.2,.8]]
    theta = np.array([[0.9, 0.1], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]])
    joint = theta.T @ np.eye(2)[y] / 4
    cond = joint / joint.sum(axis=1, keepdims=True)
    expected = np.mean([np.log(theta[i] @ cond[:, y[i]]) for i in range(4)])
    assert leep(theta, y) == pytest.approx(expected)
