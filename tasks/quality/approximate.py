"""The neighbour searches for splits too big to search exactly (``quality.search: approximate``, or ``auto``
above :data:`EXACT_ROWS`): every split projected once onto the top principal components of the centred
training features, a FAISS inverted-file index per gallery, and the near-duplicate candidates re-scored on
the full features.

Memory: the projected rows (rows x ``dims`` float32: 1.28M x 128 is 655 MB), one index over the largest split
(as much again) and the candidates' full rows; the feature files are read in chunks, three passes over the
training split (mean and sample, projection, candidates) and two over the others. Time grows with rows x the
rows each query scans (``nprobe`` of ``4 sqrt(n)`` lists), not with rows squared.

What is approximate, and said in the findings: a pair is found when the index returns it among a row's
``neighbours`` nearest in the projected space; it is then re-scored on the full rows when its cosine can
still reach the threshold (:meth:`Projected.bound`: the projected part's cosine plus the most the discarded
part can add), so its cosine is the exact one. Outlier distances and the kNN votes are those of the projected
space.
"""
from __future__ import annotations

import numpy as np

from tasks.index.plan import require_faiss
from tasks.index.retrieval import Rows, rows_at

#: a split above this many rows is searched approximately under ``search: auto`` (the exact search's time
#: grows with rows squared: measured in docs/evaluation.md#data-quality)
EXACT_ROWS = 50_000
TOLERANCE = 1e-4  # float32 slack on the bound before a candidate is left out
SAMPLE = 65_536  # training rows the principal components are fitted on
NPROBE = 16  # inverted lists each query scans
FLAT_ROWS = 20_000  # a gallery up to this size is searched exhaustively in the projected space
QUERY_BLOCK = 65_536
GATHER_BYTES = 256 << 20  # full rows of near-duplicate candidates held at once


class Projected:
    """Each split's rows centred on the training mean, projected on ``dims`` principal components of the
    training sample and scaled to unit length; the searches between them, each run once."""

    method = "approximate"

    def __init__(self, rows: dict[str, Rows], dims: int, k: int, seed: int):
        self.rows, self.k, self.seed = rows, k, seed
        self.mean, sample = _mean_and_sample(rows["train"], SAMPLE, seed)
        self.basis = _components(sample - self.mean, dims)
        self.norms: dict[str, np.ndarray] = {}  # the projected part's length of each unit row
        self.points = {s: self._project(s, r) for s, r in rows.items()}
        self._found: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def unit(self, block: np.ndarray) -> np.ndarray:
        """Full-dimension rows as the exact search compares them: centred, unit length."""
        x = np.asarray(block, dtype=np.float32) - self.mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def _project(self, split: str, rows: Rows) -> np.ndarray:
        out = np.empty((rows.n, self.basis.shape[1]), dtype=np.float32)
        norms = np.empty(rows.n, dtype=np.float32)
        for start, block in rows.chunks():
            p = self.unit(block) @ self.basis
            length = np.minimum(np.linalg.norm(p, axis=1), 1.0)
            out[start : start + len(p)] = p / np.maximum(length, 1e-12)[:, None]
            norms[start : start + len(p)] = length
        self.norms[split] = norms
        return out

    def bound(self, a: str, ra: np.ndarray, b: str, rb: np.ndarray, projected: np.ndarray) -> np.ndarray:
        """The most the full cosine of these pairs can be: unit rows are x = P p + r with |P p| = n and
        |r| = sqrt(1 - n^2), so cos = n_a n_b cos_projected + r_a . r_b <= n_a n_b cos_projected + |r_a| |r_b|."""
        na, nb = self.norms[a][ra], self.norms[b][rb]
        return na * nb * projected + np.sqrt(np.maximum(1 - na**2, 0)) * np.sqrt(np.maximum(1 - nb**2, 0))

    def search(self, query: str, gallery: str) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, gallery rows)`` of each ``query`` row's ``k`` nearest ``gallery`` rows, best first
        (within one split each row leaves itself out); -1 where the index found fewer."""
        if (query, gallery) not in self._found:
            self._found[(query, gallery)] = knn(self.points[gallery], None if query == gallery else self.points[query],
                                                self.k, self.seed)
        return self._found[(query, gallery)]

    def pairs(self, query: str, gallery: str, threshold: float) -> np.ndarray:
        """``(query row, gallery row, exact cosine)`` at or above ``threshold``, as ``search.near_pairs``."""
        sims, found = self.search(query, gallery)
        r, c = np.nonzero(found >= 0)
        q, g = r.astype(np.int64), found[r, c]
        near = self.bound(query, q, gallery, g, sims[r, c]) >= threshold - TOLERANCE
        q, g = q[near], g[near]
        if query == gallery:  # each pair once, lower row first
            q, g = np.minimum(q, g), np.maximum(q, g)
            if len(q):
                _, first = np.unique(np.stack([q, g], axis=1), axis=0, return_index=True)
                q, g = q[np.sort(first)], g[np.sort(first)]
        cosine = self._exact_cosine(query, q, gallery, g)
        keep = cosine >= threshold
        pairs = np.stack([q[keep], g[keep], cosine[keep]], axis=1) if keep.any() else np.empty((0, 3))
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -pairs[:, 2])) if len(pairs) else []
        return pairs[order]

    def _exact_cosine(self, a: str, ra: np.ndarray, b: str, rb: np.ndarray) -> np.ndarray:
        """The centred cosine of full rows ``ra`` of split ``a`` and ``rb`` of ``b``, reading only those, in
        batches of pairs whose rows fit :data:`GATHER_BYTES`."""
        out = np.empty(len(ra), dtype=np.float32)
        step = max(1, GATHER_BYTES // (8 * self.rows[a].dim))  # pairs a batch: two rows each, float32
        for start in range(0, len(ra), step):
            pa, pb = ra[start : start + step], rb[start : start + step]
            needed: dict[str, np.ndarray] = {}
            for split, r in ((a, pa), (b, pb)):
                needed[split] = np.union1d(needed.get(split, np.empty(0, dtype=np.int64)), r).astype(np.int64)
            full = {split: (take, self.unit(np.concatenate([x for _, x in rows_at(self.rows[split], take)])))
                    for split, take in needed.items()}
            (ta, xa), (tb, xb) = full[a], full[b]
            out[start : start + len(pa)] = np.einsum("ij,ij->i", xa[np.searchsorted(ta, pa)], xb[np.searchsorted(tb, pb)])
        return out

    def kth_similarity(self, split: str) -> np.ndarray:
        sims, found = self.search(split, split)
        return np.where(found[:, -1] >= 0, sims[:, -1], -1.0).astype(np.float32)

    def neighbour_labels(self, query: str, gallery: str) -> np.ndarray:
        """The labels of each query's nearest gallery rows (-1 where the index found fewer)."""
        _, found = self.search(query, gallery)
        return np.where(found >= 0, self.rows[gallery].labels[np.maximum(found, 0)], -1)


def _mean_and_sample(rows: Rows, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean of every row and a seeded sample of ``size`` rows, in one pass."""
    take = np.sort(np.random.default_rng(seed).choice(rows.n, min(size, rows.n), replace=False))
    total, picked = np.zeros(rows.dim), []
    for start, block in rows.chunks():
        block = np.asarray(block, dtype=np.float32)
        total += block.sum(axis=0, dtype=np.float64)
        inside = take[(take >= start) & (take < start + len(block))] - start
        picked.append(block[inside])
    return (total / max(rows.n, 1)).astype(np.float32), np.concatenate(picked)


def _components(centred: np.ndarray, dims: int) -> np.ndarray:
    """The top ``dims`` principal directions (dim x dims) of unit-length centred rows."""
    x = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    values, vectors = np.linalg.eigh((x.T @ x).astype(np.float64))
    return np.ascontiguousarray(vectors[:, ::-1][:, : min(dims, x.shape[1])], dtype=np.float32)


def knn(gallery: np.ndarray, queries: np.ndarray | None, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest gallery rows by inner product (``queries`` None: the gallery's own rows, each
    leaving itself out): exhaustive up to :data:`FLAT_ROWS` gallery rows, else an inverted-file index."""
    faiss = require_faiss()
    within = queries is None
    q = gallery if within else queries
    K = int(min(k + within, len(gallery)))
    index = _index(faiss, gallery, seed)
    sims = np.empty((len(q), max(K - within, 0)), dtype=np.float32)
    found = np.empty(sims.shape, dtype=np.int64)
    for start in range(0, len(q), QUERY_BLOCK):
        s, i = index.search(np.ascontiguousarray(q[start : start + QUERY_BLOCK]), K)
        if within:  # the row itself goes last (or the last neighbour, when the index missed the row)
            own = i == np.arange(start, start + len(i))[:, None]
            order = np.argsort(own, axis=1, kind="stable")[:, : K - 1]
            s, i = np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)
        sims[start : start + len(s)], found[start : start + len(i)] = s, i
    return sims, found


def _index(faiss, points: np.ndarray, seed: int):
    n, dim = points.shape
    if n <= FLAT_ROWS:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        take = np.sort(np.random.default_rng(seed).choice(n, min(n, 32 * nlist), replace=False))
        index.train(np.ascontiguousarray(points[take]))
        index.nprobe = NPROBE
    index.add(points)
    return index
