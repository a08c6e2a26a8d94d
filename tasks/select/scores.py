"""Transferability scores of a backbone's features for a labelled target, computed without training a
head: LogME (You et al. 2021), H-score, NCE and LEEP; and Kendall's tau against the probes' accuracy.
"""
from __future__ import annotations

import numpy as np

SCORES = ("logme", "h_score", "nce", "leep")


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 1e-3) -> float:
    """Mean over classes of the per-sample log evidence (higher: features explain labels better)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    sigma, v = np.linalg.eigh(f.T @ f)  # F^T F = V diag(sigma) V^T
    sigma = np.clip(sigma, 0.0, None)
    evidences = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        proj = v.T @ (f.T @ y)  # F^T y in the eigenbasis
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            gamma = float((sigma / (sigma + lam)).sum())
            m = proj / (sigma + lam)  # posterior mean in the eigenbasis: beta (alpha + beta sigma)^-1 F^T y
            alpha_de = float((m * m).sum())
            beta_de = float(((y - f @ (v @ m)) ** 2).sum())
            alpha = gamma / (alpha_de + 1e-5)
            beta = (n - gamma) / (beta_de + 1e-5)
            if abs(alpha / beta - lam) / lam < tol:
                break
        evidences.append(_evidence(n, d, alpha, beta, sigma, alpha_de, beta_de) / n)
    return float(np.mean(evidences))


def _evidence(n, d, alpha, beta, sigma, alpha_de, beta_de) -> float:
    return (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2 * (beta_de + 1e-5) - alpha / 2 * (alpha_de + 1e-5) - n / 2 * np.log(2 * np.pi))


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """tr(cov(f)^+ cov(E[f|y])): the share of feature covariance explained by class means."""
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0)
    cov = f.T @ f / len(f)
    means = np.zeros_like(f)
    for k in np.unique(labels):
        means[labels == k] = f[labels == k].mean(axis=0)
    cov_between = means.T @ means / len(f)
    return float(np.trace(np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ cov_between))


def nce(source_pred: np.ndarray, labels: np.ndarray) -> float:
    """Negative conditional entropy -H(Y | Z) of target labels given the source classifier's argmax."""
    z = np.asarray(source_pred)
    joint = np.zeros((z.max() + 1, labels.max() + 1))
    np.add.at(joint, (z, labels), 1.0)
    joint /= joint.sum()
    p_z = joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(joint > 0, joint * np.log(joint / p_z), 0.0)
    return float(cond.sum())


def leep(source_proba: np.ndarray, labels: np.ndarray) -> float:
    """Log expected empirical prediction: mean log sum_z P(y_i | z) theta(x_i)_z."""
    theta = np.asarray(source_proba, dtype=np.float64)
    n = len(labels)
    onehot = np.eye(labels.max() + 1)[labels]
    joint = theta.T @ onehot / n  # P(z, y)
    cond = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)  # P(y | z)
    eep = np.einsum("nz,zy,ny->n", theta, cond, onehot)
    return float(np.mean(np.log(np.maximum(eep, 1e-300))))


def kendall_tau(scores: list[float | None], probe: list[float]) -> float | None:
    """Rank agreement between a cheap score and probe accuracy over the candidates (None if undefined)."""
    from scipy.stats import kendalltau

    pairs = [(s, p) for s, p in zip(scores, probe) if s is not None]
    if len(pairs) < 2:
        return None
    tau = kendalltau(*zip(*pairs)).statistic
    return None if np.isnan(tau) else float(tau)
