"""Transferability scores against a straightforward reference and hand-checked cases."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.select.scores import h_score, leep, logme, nce


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


@pytest.mark.slow
def test_select_flow_ranks_candidates_and_explains_skipped_scores(tiny_config, tmp_path):
    import json

    import torch
    from torchvision.models import get_model

    from flows.experiments.selection import select_flow
    from flows.execution.local import local_run_settings

    torch.manual_seed(3)
    weights = tmp_path / "source.pt"
    torch.save(get_model("resnet18", weights=None, num_classes=5).state_dict(), weights)  # a 5-class source model
    pre = {"resize": 32, "crop": 32}
    cfg = tiny_config(select={"candidates": [
        {"label": "random", "backbone": {"name": "resnet18", "weights": "none", "preprocess": pre}},
        {"label": "random-1", "backbone": {"name": "resnet18", "weights": "none", "init_seed": 1, "preprocess": pre}},
        {"label": "source", "backbone": {"name": "resnet18", "weights": str(weights), "preprocess": pre}},
    ]})
    with local_run_settings():
        result = select_flow(cfg)
        again = select_flow(cfg)
    rows = {r["candidate"]: r for r in result.rows}
    assert [r["logme"] for r in result.rows] == sorted((r["logme"] for r in result.rows), reverse=True)
    assert rows["random"]["nce"] is None and "no source classifier" in rows["random"]["nce_skipped"]
    assert rows["source"]["nce"] is not None and rows["source"]["leep"] <= 0 and rows["source"]["nce"] <= 0
    assert set(result.kendall_tau) == {"logme", "h_score", "nce", "leep", "knn_val_acc"}
    saved = json.loads((cfg.cache_dir / "select" / "tiny" / "select.json").read_text())
    assert [r["candidate"] for r in saved["rows"]] == [r["candidate"] for r in result.rows]
    assert "Kendall τ" in (cfg.cache_dir / "select" / "tiny" / "select.md").read_text()
    assert again.rows == result.rows  # scores and probes come from the cache the second time


def test_kendall_tau_ignores_skipped_scores():
    from tasks.select.scores import kendall_tau

    assert kendall_tau([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == pytest.approx(1.0)
    assert kendall_tau([0.3, 0.2, 0.1], [0.5, 0.6, 0.7]) == pytest.approx(-1.0)
    assert kendall_tau([None, None, 0.1], [0.5, 0.6, 0.7]) is None


def test_select_config_needs_two_unique_candidates():
    from flows.config import ConfigError, parse_config

    one = {"name": "x", "select": {"candidates": [{"label": "a", "backbone": {"weights": "none"}}]}}
    with pytest.raises(ConfigError, match="select.candidates: List should have at least 2 items"):
        parse_config(one)
    dup = {"name": "x", "select": {"candidates": [{"label": "a", "backbone": {"weights": "none"}}] * 2}}
    with pytest.raises(ConfigError, match="candidate labels must be unique"):
        parse_config(dup)
