"""The index stage: build (or rebuild) a split's FAISS index, tune it to the exact search's recall, and
answer retrieval from it when ``evaluate.retrieval.index`` names one.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage import keys
from storage.features import FeatureStore
from tasks.index.plan import (
    HNSW_MAX_ROWS,
    IndexConfig,
    IndexPlan,
    IndexResult,
    is_sound,
    is_stored,
    plan_index,
    require_faiss,
)
from tasks.index.retrieval import Rows, exact_search, gallery_chunks, retrieval_metrics, row_blocks, rows_at, transform


def build_index(plan: IndexPlan) -> IndexResult:
    """Build, measure and store the index (or reuse the stored one, once its checksum holds)."""
    started = time.perf_counter()
    if is_sound(plan):
        saved = plan.files.read_result()
        return IndexResult.model_validate({**saved, "path": plan.path, "cache_hit": True, "seconds": 0.0})
    faiss = require_faiss()
    cfg = plan.config
    store = FeatureStore(plan.cache_dir)
    rows = Rows.stored(store.rows(plan.features, cfg.layer))
    fn = transform(cfg.metric, rows)
    kind = cfg.kind if cfg.kind != "auto" else ("flat" if rows.n < cfg.flat_below else
                                                "hnsw" if rows.n <= HNSW_MAX_ROWS else "ivf")
    t0 = time.perf_counter()
    index = _empty(faiss, kind, rows, cfg.metric, fn)
    for _, block in rows.chunks():
        index.add(np.ascontiguousarray(fn(block)))
    build_seconds = time.perf_counter() - t0
    queries, self_rows = _queries(store, plan, rows)
    q = np.ascontiguousarray(fn(queries))
    k = min(cfg.k, rows.n - (self_rows is not None))
    _tune(faiss, index, k)
    t0 = time.perf_counter()
    _, found = index.search(q, k + (self_rows is not None))
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = _exact(q, rows, fn, cfg.metric, k, self_rows)
    exact_s = time.perf_counter() - t0
    if self_rows is not None:
        found = np.array([[j for j in row if j != own][:k] for row, own in zip(found, self_rows)])
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact)]))
    with plan.files.staged(sound=lambda: is_stored(plan)) as staged:
        written = staged.index
        faiss.write_index(index, str(written))
        result = IndexResult(
            key=plan.key, split=plan.split, kind=kind, rows=rows.n, dim=rows.dim, build_seconds=build_seconds,
            index_bytes=written.stat().st_size, peak_rss_bytes=_peak_rss(), queries=len(q),
            recall_at_k=recall, k=k, qps_index=len(q) / max(index_s, 1e-9), qps_exact=len(q) / max(exact_s, 1e-9),
            path=plan.path, sha256=keys.file_sha256(written), cache_hit=False, seconds=0.0)
        staged.write_spec(plan.spec)
        staged.write_result(result.model_dump_json(exclude={"path", "cache_hit", "seconds", "work_fields"}))
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def _empty(faiss: Any, kind: str, rows: Rows, metric: str, fn) -> Any:
    inner = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(rows.dim) if metric == "cosine" else faiss.IndexFlatL2(rows.dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(rows.dim, 32, inner)
        index.hnsw.efConstruction = 80
        return index
    nlist = int(max(1, min(4 * np.sqrt(rows.n), rows.n // 39)))
    quantizer = faiss.IndexFlatIP(rows.dim) if metric == "cosine" else faiss.IndexFlatL2(rows.dim)
    index = faiss.IndexIVFFlat(quantizer, rows.dim, nlist, inner)
    take = np.sort(np.random.default_rng(0).choice(rows.n, min(rows.n, 256 * nlist), replace=False))
    sample = np.concatenate([block for start, block in rows_at(rows, take)])
    index.train(np.ascontiguousarray(fn(sample)))
    return index


def _tune(faiss: Any, index: Any, k: int) -> None:
    """Search settings: HNSW's efSearch at least 2k; IVF probes 1/64 of its lists, at least 16 (FAISS's
    guidance for recall near 0.9 at nlist = 4 sqrt(n); the measurement says what it gave)."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(64, 2 * k)
    if hasattr(index, "nprobe"):
        index.nprobe = min(index.nlist, max(16, index.nlist // 64))


def _queries(store: FeatureStore, plan: IndexPlan, rows: Rows) -> tuple[np.ndarray, np.ndarray | None]:
    """Held-out queries: another split's rows, or the indexed split's (then their row numbers, left out)."""
    n = plan.config.queries
    if plan.queries_from:  # its first n rows: only the chunks that hold them are read
        other = Rows.stored(store.rows(plan.queries_from, plan.config.layer))
        return next(row_blocks(other, min(n, other.n)))[1], None
    take = np.sort(np.random.default_rng(0).choice(rows.n, min(n, rows.n), replace=False))
    return np.concatenate([b for _, b in rows_at(rows, take)]), take


def _exact(q: np.ndarray, rows: Rows, fn, metric: str, k: int, self_rows: np.ndarray | None) -> np.ndarray:
    """The exact k nearest (tasks.index.retrieval's blockwise search), leaving a query's own row out."""
    chunks = gallery_chunks(rows, fn, metric, memory_bytes=0)
    if self_rows is None:
        return exact_search(q, chunks, k, None)[1]
    _, index = exact_search(q, chunks, k + 1, None)
    return np.array([[j for j in row if j != own][:k] for row, own in zip(index, self_rows)])


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def indexed_retrieval(cache_dir: Path, wanted: dict[str, Any], queries: Rows, cfg: Any) -> dict[str, Any]:
    """Retrieval metrics with the gallery searched through its index (built first if missing), and the share of
    the exact search's nearest neighbours it found (``index_recall``, at the largest k)."""
    faiss = require_faiss()
    plan = plan_index(IndexConfig.model_validate(wanted["config"]), "train", wanted["features"], cache_dir,
                      wanted.get("queries_from"))
    built = build_index(plan)
    index = faiss.read_index(str(plan.path))
    gallery = Rows.stored(FeatureStore(cache_dir).rows(plan.features, plan.config.layer))
    fn = transform(plan.config.metric, gallery)
    k_max, overlap = min(max(cfg.k), gallery.n), [0]

    def search(q: np.ndarray, K: int) -> np.ndarray:
        _tune(faiss, index, K)
        found = index.search(np.ascontiguousarray(q), K)[1]
        exact = _exact(q, gallery, fn, plan.config.metric, k_max, None)
        overlap[0] += sum(len(set(a[:k_max]) & set(b)) for a, b in zip(found, exact))
        return found

    found = retrieval_metrics(queries, gallery, cfg.k, plan.config.metric, search=search)
    return {**found, "index_kind": built.kind, "index_key": plan.key, "index_recall": overlap[0] / (queries.n * k_max),
            "index_k": k_max}
