"""Retrieval metrics computed blockwise equal their definitions computed by brute force on the full matrix."""
from __future__ import annotations

import numpy as np
import pytest

from tasks.index.retrieval import Rows, RetrievalConfig, retrieval_metrics


def brute_force(Q, yq, G, yg, ks, metric, leave_one_out=False):
    """Every pairwise similarity at once, a stable sort per query (ties: lower gallery row first), and each
    metric by its definition, one query at a time."""
    if metric == "cosine":
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        G = G / np.linalg.norm(G, axis=1, keepdims=True)
        S = Q @ G.T
    else:  # l2: nearest = smallest squared distance
        S = -((Q[:, None, :] - G[None, :, :]) ** 2).sum(axis=2)
    out = {f"recall_at_{k}": [] for k in ks} | {f"precision_at_{k}": [] for k in ks} | {"map_at_r": [], "r_precision": []}
    for i in range(len(Q)):
        cand = [j for j in range(len(G)) if not (leave_one_out and j == i)]
        order = sorted(cand, key=lambda j: (-S[i, j], j))
        rel = [yg[j] == yq[i] for j in order]
        R = sum(yg[j] == yq[i] for j in cand)
        if R == 0:
            continue
        for k in ks:
            out[f"recall_at_{k}"].append(float(any(rel[:k])))
            out[f"precision_at_{k}"].append(sum(rel[:k]) / k)
        out["r_precision"].append(sum(rel[:R]) / R)
        out["map_at_r"].append(sum(sum(rel[: p + 1]) / (p + 1) for p in range(R) if rel[p]) / R)
    return {name: float(np.mean(v)) for name, v in out.items()}, len(out["map_at_r"])


def exact_data(seed=0, n_gallery=157, n_queries=61, dim=12, classes=5):
    """Vectors of four ones: every norm is 2 and every similarity a multiple of 1/4, exact in float32, with
    many ties, so the blockwise and the brute-force rankings must agree row for row."""
    rng = np.random.default_rng(seed)

    def vectors(n):
        X = np.zeros((n, dim), np.float32)
        for row in X:
            row[rng.choice(dim, 4, replace=False)] = 1.0
        return X

    G, Q = vectors(n_gallery), vectors(n_queries)
    yg = rng.integers(0, classes, n_gallery)
    yq = rng.integers(0, classes + 1, n_queries)  # class `classes` has no gallery image: R = 0, left out
    return Q, yq, G, yg


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("chunk,block", [(7, 4096), (64, 512), (1000, 1 << 28)])
def test_blockwise_equals_brute_force_exactly(metric, chunk, block):
    Q, yq, G, yg = exact_data()
    ks = [1, 3, 10]
    got = retrieval_metrics(Rows.of(Q, yq, chunk=chunk), Rows.of(G, yg, chunk=chunk), ks, metric,
                            memory_bytes=0 if chunk == 7 else 1e9, block_bytes=block)
    want, used = brute_force(Q, yq, G, yg, ks, metric)
    assert got["queries"] == used and got["queries_without_relevant"] == int((yq == 5).sum()) > 0
    # the same ranking: one neighbour out of place would move a metric by >= 1/(61 queries x 157) = 1e-4
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)


def test_leave_one_out_within_one_split_equals_brute_force():
    Q, yq, _, _ = exact_data(seed=1, n_queries=90)
    yq = yq % 5
    ks = [1, 5]
    got = retrieval_metrics(Rows.of(Q, yq, chunk=13), None, ks, "cosine", block_bytes=4096)
    want, used = brute_force(Q, yq, Q, yq, ks, "cosine", leave_one_out=True)
    assert got["leave_one_out"] and got["gallery"] == 89 and got["queries"] == used
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)


def test_random_features_match_brute_force_and_standardized_differs_from_cosine():
    rng = np.random.default_rng(3)
    G = rng.normal(size=(300, 16)).astype(np.float32) + 2.0
    yg = rng.integers(0, 4, 300)
    G[yg == 1] += 1.5  # class 1 separable along every axis
    Q, yq = G[:80] + rng.normal(scale=0.3, size=(80, 16)).astype(np.float32), yg[:80]
    got = retrieval_metrics(Rows.of(Q, yq, 50), Rows.of(G, yg, 50), [1, 5], "cosine")
    want, _ = brute_force(Q, yq, G, yg, [1, 5], "cosine")
    assert got["map_at_r"] == pytest.approx(want["map_at_r"], abs=1e-9)
    standardized = retrieval_metrics(Rows.of(Q, yq, 50), Rows.of(G, yg, 50), [1, 5], "standardized")
    assert standardized["map_at_r"] != got["map_at_r"]  # the +2 offset dominates cosine; standardising removes it
    assert standardized["map_at_r"] > got["map_at_r"]


def test_config_validates_k_and_names_the_field():
    assert RetrievalConfig(k=[10, 1, 1]).k == [1, 10]
    with pytest.raises(ValueError, match="every k must be >= 1"):
        RetrievalConfig(k=[0, 5])


def test_embedding_map_samples_the_same_rows_and_colours_only_the_largest_classes(tmp_path):
    from tasks.evaluate.projection import draw, sample

    assert np.array_equal(sample(50_000, 20_000), sample(50_000, 20_000)) and len(sample(50_000, 20_000)) == 20_000
    assert np.array_equal(sample(300, 20_000), np.arange(300))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 1000, 3000)
    y[:400] = 7  # the largest class
    X = rng.normal(size=(3000, 16)).astype(np.float32)
    info = draw(tmp_path / "map.png", {"train": (X, y), "test": (X[:500], y[:500])}, [f"c{i}" for i in range(1000)],
                "pca", "t")
    assert info["coloured_classes"] == 20 and info["points"] == {"train": 3000, "test": 500}
    assert info["method"].startswith("PCA") and (tmp_path / "map.png").stat().st_size > 10_000


@pytest.mark.slow
def test_umap_map_when_umap_learn_is_installed(tmp_path):
    pytest.importorskip("umap")
    from tasks.evaluate.projection import draw

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 16)).astype(np.float32), rng.integers(0, 5, 300)
    info = draw(tmp_path / "map.png", {"train": (X, y), "test": (X[:50], y[:50])}, list("abcde"), "umap", "t")
    assert info["method"] == "UMAP" and info["points"] == {"train": 300, "test": 50}
    assert (tmp_path / "map.png").stat().st_size > 5_000
