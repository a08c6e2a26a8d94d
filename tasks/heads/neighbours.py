"""The neighbour heads: ``knn`` (cosine, temperature-weighted votes as in DINO, chunked exact search in
numpy or torch) and ``prototype`` (class means, nearest centroid).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tasks.heads.configs import KNNConfig, PrototypeConfig, default
from tasks.heads.grid import GridHead
from tasks.machine import cuda_possible, pick_device
from tasks.softmax import softmax


class KNNHead(GridHead):
    """k nearest neighbours by cosine similarity with temperature-weighted votes (DINO).

    Features are L2-normalised (after the optional standardisation); the
    neighbour search runs in chunks of queries and of the bank, keeping a
    running top-k, so the bank may be larger than one similarity matrix fits
    in memory. ``k`` is chosen on val from the list: one search at max(k)
    serves every candidate.
    """

    grid_param = "k"
    state_keys = ("bank_", "bank_labels_", "k_", "n_classes_", "temperature_")
    streams = True
    #: a bank left on disk (fit_rows): the FeatureRows it is read from; saved as a reference, not copied
    bank_rows_: Any = None

    def __init__(self, k=default(KNNConfig, "k"), temperature=default(KNNConfig, "temperature"),
                 preprocess=default(KNNConfig, "preprocess"), refit=default(KNNConfig, "refit"), align=default(KNNConfig, "align"),
                 chunk_size=default(KNNConfig, "chunk_size"), device=default(KNNConfig, "device"), random_state=0):
        self.k, self.temperature, self.preprocess, self.refit = k, temperature, preprocess, refit
        self.align = align
        self.chunk_size, self.device, self.random_state = chunk_size, device, random_state

    def _transform(self, X):
        X = super()._transform(X)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def _fit_candidates(self, grid, X, y, warm=None):
        if min(grid) < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0, got k={list(grid)}, temperature={self.temperature}")
        n_classes = len(self.classes_)
        return [{"bank_": X, "bank_labels_": y.astype(np.int64), "k_": np.array([int(k)]),
                 "n_classes_": np.array([n_classes]), "temperature_": np.array([self.temperature])} for k in grid]

    def _scores_with(self, state, X):
        sims, idx = self._search(state, X, int(state["k_"][0]))
        return knn_votes(sims, idx, state["bank_labels_"], int(state["n_classes_"][0]), float(state["temperature_"][0]))

    def _grid_scores(self, states, X):
        k_max = max(int(s["k_"][0]) for s in states)
        sims, idx = self._search(states[0], X, k_max)  # sorted: the first k columns are the k nearest
        return [knn_votes(sims[:, : int(s["k_"][0])], idx[:, : int(s["k_"][0])], s["bank_labels_"],
                          int(s["n_classes_"][0]), float(s["temperature_"][0])) for s in states]

    def _fit_candidates_rows(self, grid, rows, y, chunk_rows):
        self.bank_rows_ = rows
        states = self._fit_candidates(grid, np.empty((0, rows.dim), np.float32), y)
        for state in states:
            del state["bank_"]  # the bank stays in its feature file
        return states

    def _get_state(self):
        if self.bank_rows_ is None:
            return super()._get_state()
        return {k: getattr(self, k) for k in self.state_keys if k != "bank_"}

    def _search(self, state, X, k):
        device = "cpu" if self.device == "auto" and not cuda_possible() else pick_device(self.device)
        if "bank_" in state:
            return knn_search(X, state["bank_"], k, self.chunk_size, device)
        rows = self.bank_rows_
        if rows is None:
            raise ValueError("this kNN head's bank is a feature file: load it with tasks.heads.stage.load_head")
        return knn_search(X, lambda: self._transformed_chunks(rows, self.chunk_size), k, self.chunk_size, device,
                          bank_rows=rows.rows)

    def _proba(self, scores):
        return scores  # already normalised votes


def knn_search(queries, bank, k, chunk_size, device, bank_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of each query's k nearest bank rows, best first.

    ``bank``: an array, or a callable returning an iterable of ``(start, block)``
    chunks (a bank left on disk: :class:`storage.features.FeatureRows`), then
    with ``bank_rows`` its length. The bank is read once, chunk by chunk, each
    chunk scored against every query chunk with a running top-k: memory is
    O(queries x k + chunk_size^2) whatever the bank's size. On the CPU it runs
    in numpy (no torch import), elsewhere in torch (:func:`knn_torch`, which also runs on the CPU, so the
    tests compare the two here).
    """
    if callable(bank):
        chunks, n_bank = bank, int(bank_rows)
    else:
        chunks, n_bank = (lambda: ((b0, bank[b0 : b0 + chunk_size]) for b0 in range(0, len(bank), chunk_size))), len(bank)
    k = min(k, n_bank)
    if str(device) == "cpu":
        return _knn_numpy(queries, chunks, k, chunk_size)
    return knn_torch(queries, chunks, k, chunk_size, device)


def knn_torch(queries, chunks, k, chunk_size, device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_search`'s torch path on ``device``: ``chunks()`` yields ``(start, block)`` of the bank;
    ``k`` at most the bank's length."""
    import torch

    starts = range(0, len(queries), chunk_size)
    qs = [torch.as_tensor(queries[q0 : q0 + chunk_size], dtype=torch.float32, device=device) for q0 in starts]
    best = [(torch.empty((len(q), 0), device=device), torch.empty((len(q), 0), dtype=torch.long, device=device))
            for q in qs]
    for b0, block in chunks():
        b = torch.as_tensor(np.asarray(block), dtype=torch.float32, device=device)
        ids = torch.arange(b0, b0 + len(b), device=device)
        for i, q in enumerate(qs):
            sim = torch.cat([best[i][0], q @ b.T], dim=1)
            idx = torch.cat([best[i][1], ids.expand(len(q), -1)], dim=1)
            top_sim, top = sim.topk(min(k, sim.shape[1]), dim=1)
            best[i] = (top_sim, idx.gather(1, top))
    sims = np.concatenate([s.cpu().numpy() for s, _ in best]) if best else np.empty((0, k), np.float32)
    index = np.concatenate([i.cpu().numpy() for _, i in best]) if best else np.empty((0, k), np.int64)
    return sims, index


def _knn_numpy(queries, chunks, k, chunk_size) -> tuple[np.ndarray, np.ndarray]:
    starts = range(0, len(queries), chunk_size)
    qs = [np.asarray(queries[q0 : q0 + chunk_size], dtype=np.float32) for q0 in starts]
    best = [(np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)) for q in qs]
    for b0, block in chunks():
        b = np.asarray(block, dtype=np.float32)
        for i, q in enumerate(qs):
            # the chunk's own top k first (no index matrix the size of the chunk), then merged with the best so far
            sim, idx = _top_k(q @ b.T, None, min(k, len(b)), offset=b0)
            best[i] = _top_k(np.concatenate([best[i][0], sim], axis=1), np.concatenate([best[i][1], idx], axis=1),
                             min(k, best[i][0].shape[1] + sim.shape[1]))
    if not best:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([s for s, _ in best]), np.concatenate([i for _, i in best])


def _top_k(sim: np.ndarray, idx: np.ndarray | None, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest similarities, ties broken by the lower bank index (as a stable sort would).

    ``idx``: each column's bank index, or None for ``offset + column``. Preselects
    2k candidates with ``argpartition`` (linear time) and sorts only those; a row
    whose k-th value ties with the candidates' last is sorted in full.
    """
    def index(rows, cols):
        return cols + offset if idx is None else np.take_along_axis(idx[rows], cols, 1)

    every = slice(None)
    m = 2 * k
    if sim.shape[1] <= m:
        cols = np.arange(sim.shape[1]) + offset if idx is None else idx
        order = np.lexsort((np.broadcast_to(cols, sim.shape), -sim), axis=-1)[:, :k]
        return np.take_along_axis(sim, order, 1), index(every, order)
    part = np.argpartition(sim, sim.shape[1] - m, axis=1)[:, -m:]
    cs, ci = np.take_along_axis(sim, part, 1), index(every, part)
    order = np.lexsort((ci, -cs), axis=-1)
    cs, ci = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
    unsure = np.flatnonzero(cs[:, k - 1] <= cs[:, m - 1])  # a tie may reach past the candidates
    if len(unsure):
        cols = np.broadcast_to(np.arange(sim.shape[1]) + offset, (len(unsure), sim.shape[1])) if idx is None \
            else idx[unsure]
        full = np.lexsort((cols, -sim[unsure]), axis=-1)[:, :m]
        cs[unsure], ci[unsure] = np.take_along_axis(sim[unsure], full, 1), np.take_along_axis(cols, full, 1)
    return cs[:, :k], ci[:, :k]


def knn_votes(sims, index, labels, n_classes, temperature) -> np.ndarray:
    """(N, n_classes) class probabilities: exp(similarity / T) summed per class over the neighbours, normalised."""
    votes = np.zeros((len(sims), n_classes), dtype=np.float64)
    weights = np.exp((sims.astype(np.float64) - 1.0) / temperature)  # shifted by the max similarity: no overflow
    np.add.at(votes, (np.arange(len(sims))[:, None], labels[index]), weights)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)


class PrototypeHead(GridHead):
    """Nearest class mean by cosine ("SimpleShot", Wang et al. 2019): features (after the optional
    preprocessing) are centred on the training mean (``centre: target``: the mean of the unlabelled target
    features) and L2-normalised; each class is the normalised mean of its training features; scores are
    cosines divided by a temperature. Nothing is fitted by optimisation, so it is as good with one label per
    class as the features allow.

    The temperature does not change which class wins, only how sure the probabilities are: it is chosen on
    validation by log-loss, not by accuracy. The scores are linear in the transformed features (``coef_`` =
    prototypes / temperature), so it saves, loads and predicts as the linear heads do.
    """

    grid_param = "temperature"
    state_keys = ("coef_", "intercept_", "centre_")

    def __init__(self, temperature=default(PrototypeConfig, "temperature"), preprocess=default(PrototypeConfig, "preprocess"),
                 centre=default(PrototypeConfig, "centre"), refit=default(PrototypeConfig, "refit"),
                 align=default(PrototypeConfig, "align"), random_state=0):
        self.temperature, self.preprocess, self.centre, self.refit = temperature, preprocess, centre, refit
        self.align, self.random_state = align, random_state

    def fit(self, X, y, X_val=None, y_val=None, X_target=None):
        if self.centre not in ("train", "target"):
            raise ValueError(f"centre={self.centre!r} is not one of ('train', 'target')")
        if self.centre == "target" and X_target is None:
            raise ValueError("centre='target' needs X_target: unlabelled features of the target domain")
        self._target = X_target
        try:
            return super().fit(X, y, X_val, y_val, X_target)
        finally:
            self._target = None

    def _fit_preprocess(self, X):
        super()._fit_preprocess(X)
        base = X if self.centre == "train" else np.asarray(self._target, dtype=X.dtype)
        self.centre_ = super()._transform(base).mean(axis=0).astype(X.dtype)

    def _transform(self, X):
        X = super()._transform(X) - self.centre_
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def _fit_candidates(self, grid, X, y, warm=None):
        if min(grid) <= 0:
            raise ValueError(f"temperature needs values > 0, got {list(grid)}")
        n_classes = len(self.classes_)
        sums = np.zeros((n_classes, X.shape[1]), dtype=np.float64)
        np.add.at(sums, y, X)
        means = sums / np.maximum(np.bincount(y, minlength=n_classes), 1)[:, None]
        prototypes = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return [{"coef_": (prototypes / t).astype(X.dtype), "intercept_": np.zeros(n_classes, X.dtype),
                 "centre_": self.centre_} for t in grid]

    def _select(self, grid, states, Xv, yv):
        """The temperature with the lowest validation log-loss (ties: the first); accuracy is the same for all."""
        losses, accuracies = [], []
        for scores in self._grid_scores(states, Xv):
            proba = softmax(scores.astype(np.float64))
            losses.append(float(-np.mean(np.log(np.maximum(proba[np.arange(len(yv)), yv], 1e-300)))))
            accuracies.append(float(np.mean(scores.argmax(1) == yv)))
        best = int(np.argmin(losses))
        self.grid_ = [{self.grid_param: v, "val_accuracy": a, "val_log_loss": loss}
                      for v, a, loss in zip(grid, accuracies, losses)]
        self.best_param_ = grid[best]
        self.val_accuracy_ = accuracies[best]
        return best
