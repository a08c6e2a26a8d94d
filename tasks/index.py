"""An approximate nearest-neighbour index (FAISS) over a cached split, measured when it is built.

``kind: auto`` picks by size: an exact flat index below ``flat_below`` rows (100k), HNSW up to two million rows,
IVF-Flat above (its nlist = 4 sqrt(rows), trained on a seeded sample, 1/64 of the lists probed). Cosine indexes L2-normalised rows with
inner product; ``l2`` indexes the rows as they are. In the same run it records what the index costs and gives:
build time, file size and peak RSS, queries per second against the exact blockwise search
(:mod:`tasks.retrieval`, numpy) on the same queries, and recall@k, the share of the exact k nearest neighbours the
index returns. The queries are held out: up to ``queries`` rows of another split (test, else val) when the
experiment has one, else of the indexed split with each query's own row left out of both searches.

The index is written with ``faiss.write_index`` (FAISS's own binary format, never pickle) into
``indexes/<key>/index.faiss``, keyed by the split's feature key and these settings, with its sha256 in the result;
a second build is a hit once the file matches it (a damaged index is quarantined and built again).
``pip install 'transferpipe[index]'`` installs faiss-cpu.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.features import FeatureStore
from storage.layout import CacheLayout
from storage.records import StageFiles
from tasks.result import StageResult
from tasks.retrieval import Rows, _blocks, _gallery_chunks, _search, retrieval_metrics, transform

HNSW_MAX_ROWS = 2_000_000


class IndexConfig(BaseModel):
    """``transferpipe index`` settings (its flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str = Field("train", description="the split indexed (its name; the key holds its feature key)")
    layer: str = "penultimate"
    metric: Literal["cosine", "l2"] = "cosine"
    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    flat_below: int = Field(100_000, ge=1, description="auto: an exact flat index below this many rows")
    queries: int = Field(1000, ge=1, le=100_000, description="held-out queries of the recall measurement")
    k: int = Field(10, ge=1, le=1000, description="recall@k of the measurement")


class IndexPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    spec: dict[str, Any]
    split: str
    features: str
    queries_from: str | None  # another split's feature key (held-out queries), or None: the split itself
    config: IndexConfig
    cache_dir: Path

    @property
    def files(self) -> StageFiles:
        return StageFiles(CacheLayout(self.cache_dir).index(self.key))

    @property
    def path(self) -> Path:
        return self.files.folder / "index.faiss"


class IndexResult(StageResult):
    key: str
    split: str
    kind: str
    rows: int
    dim: int
    build_seconds: float
    index_bytes: int
    peak_rss_bytes: int
    queries: int
    recall_at_k: float
    k: int
    qps_index: float
    qps_exact: float
    path: Path
    sha256: str = ""  # of index.faiss, checked before the file is read
    work_fields: tuple[str, ...] = ()

    @property
    def speedup(self) -> float:
        return self.qps_index / self.qps_exact if self.qps_exact else float("nan")


def require_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ValueError("a FAISS index needs faiss-cpu: pip install 'transferpipe[index]'") from None
    return faiss


def plan_index(config: IndexConfig, split: str, feature_key: str, cache_dir: Path,
               queries_from: str | None = None) -> IndexPlan:
    spec = {"kind": "index", "version": keys.CODE_VERSIONS["index"], "features": feature_key,
            "queries": queries_from, **config.model_dump(mode="json", exclude={"split"})}
    return IndexPlan(key=keys.key(spec), spec=spec, split=split, features=feature_key, queries_from=queries_from,
                     config=config, cache_dir=cache_dir)


def is_stored(plan: IndexPlan) -> bool:
    """A result with its checksum, and an index file of the size it records (the checksum is read later)."""
    saved = plan.files.read_result()
    try:
        return bool(saved and saved.get("sha256")) and plan.path.stat().st_size == saved["index_bytes"]
    except (OSError, KeyError, TypeError):
        return False


def is_sound(plan: IndexPlan) -> bool:
    """Whether the stored index is the one that was built: its sha256 as recorded. A damaged one (truncated,
    overwritten, its vectors permuted) is moved to ``indexes/quarantine/`` and the caller builds it again."""
    import logging

    saved = plan.files.read_result()
    if not (saved and saved.get("sha256") and plan.path.is_file()):
        return False  # never built (or built before checksums: built again)
    if is_stored(plan) and keys.file_sha256(plan.path) == saved["sha256"]:
        return True
    aside = CacheLayout(plan.cache_dir).index_quarantine(plan.key, time.strftime("%Y%m%dT%H%M%S"))
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(plan.files.folder, aside)
    logging.getLogger("transferpipe.index").warning(
        "index %s does not match its checksum (damaged since it was built): moved to %s; building it again",
        plan.path, aside)
    return False


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
        written = staged.folder / plan.path.name
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
    sample = np.concatenate([block for start, block in _rows_at(rows, take)])
    index.train(np.ascontiguousarray(fn(sample)))
    return index


def _rows_at(rows: Rows, take: np.ndarray):
    """The rows at the sorted indices ``take``, read chunk by chunk."""
    for start, block in rows.chunks():
        inside = take[(take >= start) & (take < start + len(block))] - start
        if len(inside):
            yield start, np.asarray(block)[inside]


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
        return next(_blocks(other, min(n, other.n)))[1], None
    take = np.sort(np.random.default_rng(0).choice(rows.n, min(n, rows.n), replace=False))
    return np.concatenate([b for _, b in _rows_at(rows, take)]), take


def _exact(q: np.ndarray, rows: Rows, fn, metric: str, k: int, self_rows: np.ndarray | None) -> np.ndarray:
    """The exact k nearest (tasks.retrieval's blockwise search), leaving a query's own row out."""
    chunks = _gallery_chunks(rows, fn, metric, memory_bytes=0)
    if self_rows is None:
        return _search(q, chunks, k, None)[1]
    _, index = _search(q, chunks, k + 1, None)
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
