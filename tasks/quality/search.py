"""The neighbour searches the findings need, streamed: each block of query rows against the gallery's chunks
with a running top-k (:func:`tasks.index.retrieval.exact_search`), never a rows x rows matrix.

- :func:`near_pairs`: near-duplicates, within a split (each pair once) or from one split into another;
- :func:`kth_similarity`: how far each row is from its k-th neighbour (overall, or within its class), the
  outlier score;
- :func:`neighbour_labels`: the labels of each row's nearest gallery rows (the vote for val/test labels).
"""
from __future__ import annotations

import numpy as np

from tasks.index.retrieval import Rows, exact_search, gallery_chunks, row_blocks, similarities_of

QUERY_BLOCK = 1024


def centred(rows: Rows):
    """Rows as the finders compare them: minus the mean of ``rows`` (one streamed pass), then L2-normalised.

    Raw post-ReLU features share a large positive component, so any two images of a dataset sit near cosine
    1; centring removes it. Scaling each dimension by its deviation as well ("standardized") does not do here:
    a dimension that barely varies over the dataset (many ImageNet channels on digits) is then mostly noise,
    and faint pixel noise moved a copy to cosine 0.09 from its original."""
    total = np.zeros(rows.dim)
    for _, block in rows.chunks():
        total += np.asarray(block, dtype=np.float64).sum(axis=0)
    mean = (total / max(rows.n, 1)).astype(np.float32)

    def fn(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32) - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return fn


def _search(queries: Rows, gallery: Rows | None, k: int, memory_bytes: float, fn=None):
    """Yield ``(first row, similarities, gallery rows)`` per block of queries, best first; ``gallery`` None:
    the queries themselves, each leaving itself out. ``fn``: the :func:`centred` transform of both sides
    (default: centred on the gallery, one pass over it)."""
    within = gallery is None
    gallery = queries if within else gallery
    K = int(min(k, gallery.n - int(within)))
    if K < 1:
        return
    fn = fn or centred(gallery)
    chunks = gallery_chunks(gallery, fn, "cosine", memory_bytes, rows=2 * K)
    for q0, qb in row_blocks(queries, QUERY_BLOCK):
        keys, rows = exact_search(fn(qb), chunks, K, q0 if within else None)
        yield q0, similarities_of(keys), rows


def near_pairs(queries: Rows, gallery: Rows | None, k: int, threshold: float, memory_bytes: float,
               fn=None) -> np.ndarray:
    """``(query row, gallery row, cosine)`` of every neighbour at or above ``threshold`` (the ``k`` nearest at
    most), most similar first; within one split each pair once (lower row first). ``fn``: as :func:`_search`."""
    found = []
    for q0, sims, rows in _search(queries, gallery, k, memory_bytes, fn):
        r, c = np.nonzero(sims >= threshold)
        found.append(np.stack([q0 + r, rows[r, c], sims[r, c]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 3))
    if gallery is None and len(pairs):
        lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
        pairs = np.stack([lo, hi, pairs[:, 2]], axis=1)
        _, first = np.unique(pairs[:, :2], axis=0, return_index=True)
        pairs = pairs[np.sort(first)]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -pairs[:, 2])) if len(pairs) else []
    return pairs[order]


def kth_similarity(rows: Rows, k: int, memory_bytes: float) -> np.ndarray:
    """Each row's cosine to its k-th nearest other row (lower: further from everything)."""
    out = np.ones(rows.n, dtype=np.float32)
    for q0, sims, _ in _search(rows, None, k, memory_bytes):
        out[q0 : q0 + len(sims)] = sims[:, -1]
    return out


def kth_similarity_in_class(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Each row's cosine to its k-th nearest other row of its own class (1 for a class of one image)."""
    out = np.ones(len(labels), dtype=np.float32)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        sub = Rows.of(X[members], labels[members])
        out[members] = kth_similarity(sub, min(k, len(members) - 1), memory_bytes=float("inf"))
    return out


def neighbour_labels(queries: Rows, gallery: Rows | None, k: int, memory_bytes: float, fn=None) -> np.ndarray:
    """The labels of each query's ``k`` nearest gallery rows (``gallery`` None: the queries' other rows)."""
    bank = queries if gallery is None else gallery
    out = np.zeros((queries.n, int(min(k, bank.n - int(gallery is None)))), dtype=np.int64)
    for q0, _, rows in _search(queries, gallery, k, memory_bytes, fn):
        out[q0 : q0 + len(rows)] = bank.labels[rows]
    return out


class Exact:
    """The findings' searches over every row (:func:`near_pairs`, :func:`kth_similarity`,
    :func:`neighbour_labels`), one split's rows against another's; the approximate counterpart is
    :class:`tasks.quality.approximate.Projected`."""

    method = "exact"

    def __init__(self, rows: dict[str, Rows], k: int, memory_bytes: float):
        self.rows, self.k, self.memory = rows, k, memory_bytes
        self.fn = centred(rows["train"])  # one centring (the training mean) for every pair

    def _gallery(self, query: str, gallery: str) -> Rows | None:
        return None if query == gallery else self.rows[gallery]

    def pairs(self, query: str, gallery: str, threshold: float) -> np.ndarray:
        return near_pairs(self.rows[query], self._gallery(query, gallery), self.k, threshold, self.memory, self.fn)

    def kth_similarity(self, split: str) -> np.ndarray:
        return kth_similarity(self.rows[split], self.k, self.memory)

    def neighbour_labels(self, query: str, gallery: str) -> np.ndarray:
        return neighbour_labels(self.rows[query], self._gallery(query, gallery), self.k, self.memory, self.fn)
