"""Retrieval evaluation on cached features: Recall@k, precision@k, R-precision and mAP@R, blockwise.

Queries (the test split) search a gallery (the train split, or the test split itself leaving each query out);
an item is relevant when it has the query's class. With R the number of relevant gallery items of a query:

- Recall@k: 1 if any of the k nearest is relevant (the metric-learning convention), averaged over queries;
- precision@k: the share of the k nearest that is relevant;
- R-precision: precision@R;
- mAP@R ("A Metric Learning Reality Check", Musgrave et al. 2020): (1/R) sum over i <= R of P(i) where the i-th
  nearest is relevant, P(i) the precision at i.

Queries without a relevant gallery item (R = 0) are left out and counted. Neighbours are ranked by similarity,
ties by the lower gallery row (as the kNN head's search, :func:`tasks.heads.neighbours._top_k`, breaks them). The search never forms a query x
gallery matrix: each block of queries streams the gallery in chunks with a running top-K (K = max(k, R)), and
a chunk whose every similarity is below a query's current K-th is skipped for it. Memory is
O(block x (K + chunk)) plus the gallery when it fits the heads' memory budget (else it is read from its HDF5
file once per query block). Similarities: cosine (default), ``l2`` (negative squared distance), or cosine after
standardising with the gallery's mean and standard deviation (``standardized``, as the heads' preprocessing).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

Chunks = Callable[[], Iterator[tuple[int, np.ndarray]]]
BLOCK_BYTES = 256 * 2**20  # the running top-K of one query block (similarities, indices and the merge)


class RetrievalConfig(BaseModel):
    """``evaluate.retrieval``: test images as queries against a gallery, on the stored features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="Recall@k and precision@k")
    gallery: Literal["train", "test"] = Field(
        "train", description="train: the test split searches the train split; test: leave-one-out within test")
    metric: Literal["cosine", "l2", "standardized"] = "cosine"
    layer: str = "penultimate"
    index: Literal["exact", "faiss"] = Field(
        "exact", description="faiss: search the split's FAISS index (transferpipe index) and report the recall lost")
    chunk_size: int = Field(4096, ge=1, le=1 << 20, description="gallery rows scored at once")

    @field_validator("k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"every k must be >= 1, got {v}")
        return sorted(set(v))


@dataclass(frozen=True)
class Rows:
    """Feature rows in chunks: labels in memory, ``chunks()`` yielding ``(start, block)`` in row order."""

    labels: np.ndarray
    chunks: Chunks
    dim: int
    chunk: int  # rows per chunk

    @property
    def n(self) -> int:
        return len(self.labels)

    @classmethod
    def of(cls, X: np.ndarray, labels: np.ndarray, chunk: int = 4096) -> Rows:
        return cls(np.asarray(labels), lambda: ((i, X[i : i + chunk]) for i in range(0, len(X), chunk)), X.shape[1],
                   chunk)

    @classmethod
    def stored(cls, rows: Any, chunk: int = 4096) -> Rows:
        """A :class:`storage.features.FeatureRows` (the first full pass verifies its checksum)."""
        passes = iter(range(1 << 62))
        return cls(rows.labels, lambda: rows.chunks(chunk, verify=next(passes) == 0), rows.dim, chunk)


def transform(metric: str, gallery: Rows) -> Callable[[np.ndarray], np.ndarray]:
    """Rows as the metric compares them: L2-normalised (cosine), standardised then normalised, or as they are."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    if metric == "cosine":
        return lambda x: unit(np.asarray(x, dtype=np.float32))
    if metric == "l2":
        return lambda x: np.asarray(x, dtype=np.float32)
    if metric == "standardized":
        total, squares = np.zeros(gallery.dim), np.zeros(gallery.dim)
        for _, block in gallery.chunks():
            block = np.asarray(block, dtype=np.float64)
            total += block.sum(axis=0)
            squares += (block * block).sum(axis=0)
        mean = total / gallery.n
        std = np.sqrt(np.maximum(squares / gallery.n - mean * mean, 0.0))
        mean32, std32 = mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)
        return lambda x: unit((np.asarray(x, dtype=np.float32) - mean32) / std32)
    raise ValueError(f"retrieval metric {metric!r}: use cosine, l2 or standardized")


def retrieval_metrics(queries: Rows, gallery: Rows | None, ks: list[int], metric: str = "cosine",
                      memory_bytes: float = 0.0, block_bytes: int = BLOCK_BYTES,
                      search: Callable[[np.ndarray, int], np.ndarray] | None = None) -> dict[str, Any]:
    """Every metric of one query set against one gallery (``None``: the queries themselves, leaving each out).

    ``memory_bytes``: the gallery is held in memory (as float32, transformed) when it fits, else streamed.
    ``search(queries, K)``: another search of the gallery (an index, tasks/index/stage.py) in place of the exact one;
    it gets transformed queries and returns their K nearest gallery rows, best first (-1: none found).
    """
    leave_one_out = gallery is None
    gallery = queries if gallery is None else gallery
    if gallery.dim != queries.dim:
        raise ValueError(f"queries have {queries.dim} dimensions, the gallery {gallery.dim}")
    n_gallery = gallery.n - int(leave_one_out)
    counts = np.bincount(gallery.labels, minlength=int(max(queries.labels.max(initial=0), gallery.labels.max(initial=0))) + 1)
    relevant = counts[queries.labels] - int(leave_one_out)
    K = int(min(max(max(ks), int(relevant.max(initial=0))), n_gallery))
    if K < 1:
        raise ValueError("the gallery has no image to retrieve")
    fn = transform(metric, gallery)
    if search is None:
        chunks = gallery_chunks(gallery, fn, metric, memory_bytes, rows=2 * K)
    block = int(np.clip(block_bytes // (K * 12 * 3), 1, 8192))
    sums: dict[str, float] = {}
    for q0, qb in row_blocks(queries, block):
        q = fn(qb)
        index = search(q, K) if search else exact_search(q, chunks, K, q0 if leave_one_out else None)[1]
        hit = (gallery.labels[np.maximum(index, 0)] == queries.labels[q0 : q0 + len(qb), None]) & (index >= 0)
        _accumulate(sums, hit, relevant[q0 : q0 + len(qb)], ks)
    used = int(sums.pop("queries", 0))
    out: dict[str, Any] = {name: value / used if used else None for name, value in sums.items()}
    return {"queries": used, "queries_without_relevant": int((relevant <= 0).sum()), "gallery": n_gallery,
            "metric": metric, "leave_one_out": leave_one_out, "k": list(ks), **out}


def rows_at(rows: Rows, take: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The rows at the sorted indices ``take``, read chunk by chunk (one pass; chunks without one are skipped
    after reading)."""
    for start, block in rows.chunks():
        inside = take[(take >= start) & (take < start + len(block))] - start
        if len(inside):
            yield start, np.asarray(block)[inside]


def row_blocks(rows: Rows, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks of ``size`` rows (the last may be shorter) from the rows' chunks, whatever the chunks' own size."""
    pending, start = [], 0
    for s, block in rows.chunks():
        pending.append(np.asarray(block))
        while sum(len(p) for p in pending) >= size:
            joined = np.concatenate(pending)
            yield start, joined[:size]
            start, pending = start + size, [joined[size:]]
    rest = np.concatenate(pending) if pending else np.empty((0, rows.dim))
    if len(rest):
        yield start, rest


def gallery_chunks(gallery: Rows, fn, metric: str, memory_bytes: float, rows: int = 0) -> Chunks:
    """The transformed gallery, in memory when it fits, with ``-|g|^2 / 2`` per row for ``l2``; chunks of at
    least ``rows`` rows (stored chunks joined), so merging the running top-K costs O(1) per gallery row.
    Yields ``(start, rows, bias)`` as :func:`exact_search` takes them."""
    def prepared(block: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        g = fn(block)
        return g, (-0.5 * (g * g).sum(axis=1)) if metric == "l2" else None

    def blocks():
        return row_blocks(gallery, max(rows, gallery.chunk))

    if gallery.n * gallery.dim * 4 <= memory_bytes:
        held = [(start, *prepared(block)) for start, block in blocks()]
        return lambda: iter(held)
    return lambda: ((start, *prepared(block)) for start, block in blocks())


def ranking_keys(sim: np.ndarray, start: int) -> np.ndarray:
    """One uint64 per similarity that sorts as (similarity descending, gallery row ascending): the float32's
    order-preserving bits above, the complement of the row below. Keys are unique, so a partial sort
    (``np.partition``) picks the same top K as a full stable sort would, ties included. ``sim``'s columns are
    gallery rows ``start``, ``start + 1``, ..."""
    return encode(sim, np.arange(start, start + sim.shape[-1], dtype=np.uint64))


def encode(sim: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`ranking_keys` of similarities whose gallery rows are ``rows`` (broadcast against ``sim``)."""
    sim = np.asarray(sim, dtype=np.float32) + np.float32(0.0)  # -0.0 becomes 0.0: equal similarities, equal bits
    bits = np.ascontiguousarray(sim).view(np.uint32).astype(np.uint64)
    ordered = np.where(bits >> np.uint64(31), ~bits & np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    return (ordered << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.asarray(rows, dtype=np.uint64))


def rows_of(keys: np.ndarray) -> np.ndarray:
    return (np.uint64(0xFFFFFFFF) - (keys & np.uint64(0xFFFFFFFF))).astype(np.int64)


def similarities_of(keys: np.ndarray) -> np.ndarray:
    """The float32 similarity each ranking key holds (:func:`ranking_keys` inverted)."""
    ordered = keys >> np.uint64(32)
    bits = np.where(ordered & np.uint64(0x80000000), ordered ^ np.uint64(0x80000000), ~ordered & np.uint64(0xFFFFFFFF))
    return bits.astype(np.uint32).view(np.float32)


def exact_search(q: np.ndarray, chunks, K: int, self_start: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's K most similar gallery rows, best first, as (ranking keys, rows); ``self_start``: the
    queries' first row in the gallery, whose own row is left out.

    A running top-K of :func:`ranking_keys`: each chunk's keys joined to it and partitioned (linear time), a
    query skipped when none of the chunk beats its K-th; one sort at the end.
    """
    n = len(q)
    best = np.empty((n, 0), np.uint64)
    own = np.arange(n) + (self_start or 0)
    for g0, g, bias in chunks():
        sim = q @ g.T
        if bias is not None:
            sim += bias
        if self_start is not None:
            mine = np.flatnonzero((own >= g0) & (own < g0 + len(g)))
            sim[mine, own[mine] - g0] = -np.inf
        if best.shape[1] < K:
            joined = np.concatenate([best, ranking_keys(sim, g0)], axis=1)
            width = min(K, joined.shape[1])
            best = np.partition(joined, joined.shape[1] - width, axis=1)[:, joined.shape[1] - width:]
            continue
        # only a similarity >= a query's K-th can enter (an equal one may: the keys decide); once the running
        # top-K has settled that is a few columns of a chunk, so only those are encoded and merged
        passing = sim >= similarities_of(best.min(axis=1))[:, None]
        rows = np.flatnonzero(passing.any(axis=1))
        if len(rows):
            r, c = np.nonzero(passing[rows])
            counts = np.bincount(r, minlength=len(rows))
            slot = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
            candidates = np.zeros((len(rows), int(counts.max())), np.uint64)  # 0 ranks below every key
            candidates[r, slot] = encode(sim[rows[r], c], c.astype(np.uint64) + np.uint64(g0))
            joined = np.concatenate([best[rows], candidates], axis=1)
            best[rows] = np.partition(joined, joined.shape[1] - K, axis=1)[:, -K:]
    best = np.sort(best, axis=1)[:, ::-1]
    return best, rows_of(best)


def _accumulate(sums: dict[str, float], rel: np.ndarray, R: np.ndarray, ks: list[int]) -> None:
    """Add one block's per-query metrics (queries with R > 0) to ``sums``."""
    keep = R > 0
    rel, R = rel[keep], R[keep]
    if not len(R):
        return
    pos = np.arange(1, rel.shape[1] + 1)
    within = pos[None, :] <= R[:, None]
    hits = np.cumsum(rel, axis=1)
    add = {"queries": float(len(R)),
           "map_at_r": float((((hits / pos) * rel * within).sum(axis=1) / R).sum()),
           "r_precision": float(((rel * within).sum(axis=1) / R).sum())}
    for k in ks:
        add[f"recall_at_{k}"] = float(rel[:, :k].any(axis=1).sum())
        add[f"precision_at_{k}"] = float((hits[:, min(k, rel.shape[1]) - 1] / k).sum())
    for name, value in add.items():
        sums[name] = sums.get(name, 0.0) + value


def metric_names(ks: list[int]) -> list[str]:
    return [*(f"recall_at_{k}" for k in ks), *(f"precision_at_{k}" for k in ks), "r_precision", "map_at_r"]


def label(name: str) -> str:
    """``recall_at_5`` as the report writes it: ``Recall@5``."""
    names = {"r_precision": "R-precision", "map_at_r": "mAP@R"}
    if name in names:
        return names[name]
    what, k = name.rsplit("_at_", 1)
    return f"{what.capitalize()}@{k}"
