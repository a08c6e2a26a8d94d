"""The quality stage: its streamed searches equal brute force, its Confident Learning flags the rows cleanlab
flags on the same probabilities, and a planted leak, label flip and outlier are found in a real run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import make_imagefolder

from tasks.index.retrieval import Rows
from tasks.quality import label_issues as cl
from tasks.quality.search import centred, kth_similarity, kth_similarity_in_class, near_pairs, neighbour_labels


def clustered(n: int = 300, dim: int = 16, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def brute(a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Cosine after subtracting ``centre``'s mean, computed directly."""
    mean = centre.astype(np.float64).mean(axis=0)
    a, b = a - mean, b - mean
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def test_near_pairs_streamed_equal_brute_force_within_and_across_splits():
    X, y = clustered()
    Q = np.concatenate([X[:5] + 1e-3, clustered(40, seed=1)[0]])  # five planted near-copies of train rows
    for memory in (0.0, float("inf")):  # streamed from chunks, and held in memory
        train, test = Rows.of(X, y, chunk=37), Rows.of(Q, np.zeros(len(Q), int), chunk=11)
        across = near_pairs(test, train, 5, 0.99, memory, centred(train))
        sims = brute(Q, X, X)
        expect = {(q, g) for q, g in zip(*np.nonzero(sims >= 0.99))}
        assert {(int(q), int(g)) for q, g, _ in across} == expect and {(i, i) for i in range(5)} <= expect
        X2 = np.concatenate([X, X[:3]])  # three exact repeats within one split
        within = near_pairs(Rows.of(X2, np.zeros(len(X2), int), chunk=50), None, 5, 0.999, memory)
        assert sorted((int(a), int(b)) for a, b, _ in within) == [(0, 300), (1, 301), (2, 302)]


def test_kth_neighbour_similarity_equals_brute_force_overall_and_in_class():
    X, y = clustered(120)
    sims = brute(X, X, X)
    np.fill_diagonal(sims, -np.inf)
    expect = np.sort(sims, axis=1)[:, -4]
    assert np.allclose(kth_similarity(Rows.of(X, y, chunk=16), 4, 0.0), expect, atol=1e-5)
    in_class = kth_similarity_in_class(X, y, 4)
    for c in range(4):
        members = np.flatnonzero(y == c)
        sub = brute(X[members], X[members], X[members])
        np.fill_diagonal(sub, -np.inf)
        assert np.allclose(in_class[members], np.sort(sub, axis=1)[:, -4], atol=1e-5)


def test_neighbour_votes_say_who_disagrees_with_its_label():
    X, y = clustered(200)
    given = y[:20].copy()
    given[:3] = (given[:3] + 1) % 4  # three wrong labels
    votes = neighbour_labels(Rows.of(X[:20] + 1e-3, given), Rows.of(X[20:], y[20:]), 7, 0.0)
    against, majority = cl.vote_disagreement(votes, given, 4)
    assert set(np.flatnonzero((majority != given) & (against > 0.5))) == {0, 1, 2}


@pytest.mark.parametrize("seed", range(6))
def test_confident_learning_flags_the_rows_cleanlab_flags(seed):
    find_label_issues = pytest.importorskip("cleanlab.filter").find_label_issues
    rng = np.random.default_rng(seed)
    n, k = 400, 3 + seed
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 3.0 * np.eye(k)[y]
    flipped = rng.choice(n, 40, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, k, 40)) % k  # noisy labels
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    theirs = find_label_issues(y, proba, filter_by="confident_learning")
    ours = cl.confident_learning(y, proba)
    assert ours.sum() > 10 and np.array_equal(ours, theirs)


def test_out_of_fold_probabilities_never_see_their_row():
    X, y = clustered(90)
    y[:5] = (y[:5] + 1) % 4  # a model that saw them would fit their flipped labels
    proba = cl.out_of_fold(X, y, 4, folds=3, seed=0)
    assert np.allclose(proba.sum(axis=1), 1) and (cl.self_confidence(y, proba)[:5] < 0.5).all()


@pytest.mark.slow
def test_a_planted_leak_label_flip_and_outlier_are_found_and_drawn(tiny_config, tmp_path):
    from flows.local import local_run_settings
    from flows.pipeline import pipeline_flow

    root = make_imagefolder(tmp_path / "planted", n_per_class=8, splits=("train", "test"))
    shutil.copy2(root / "train/class0/003.png", root / "test/class0/leak.png")  # byte-identical
    shutil.move(root / "train/class1/005.png", root / "train/class2/flipped.png")
    cfg = tiny_config(data={"root": str(root)}, quality={"neighbours": 3, "folds": 2, "top": 5},
                      heads=[{"kind": "knn", "k": [1]}])
    with local_run_settings():
        first = pipeline_flow(cfg, stop_after="quality").quality
        again = pipeline_flow(cfg, stop_after="quality").quality
        run = pipeline_flow(cfg)  # the evaluation scores the test split with and without its leaked images
    findings = json.loads((first.folder / "findings.json").read_text())
    leak = {"a": "train/class0/003.png", "b": "test/class0/leak.png"}
    assert any(p["a"] == leak["a"] and p["b"] == leak["b"] and p["exact"] for p in findings["duplicates"]["train-test"])
    assert "test/class0/leak.png" in findings["leaked_test"] and first.leaked_test >= 1 and first.exact_duplicates >= 1
    assert len(findings["outliers"]["train"]) == 5 and findings["label_issues"]["train"]["method"]
    assert (first.folder / "duplicates.png").stat().st_size > 0 and (first.folder / "outliers.png").exists()
    assert "## Near-duplicates and leaks" in first.report.read_text()
    assert again.cache_hit and again.key == first.key and again.duplicates == first.duplicates
    metrics = run.models[0].metrics
    assert metrics["leaked_test_images"] == first.leaked_test and metrics["top1_without_leaks"] is not None
    assert run.quality.cache_hit and "top1 without leaks" in run.report.read_text()
