"""An approximate nearest-neighbour index (FAISS) over a cached split, measured when it is built.

``kind: auto`` picks by size: an exact flat index below ``flat_below`` rows (100k), HNSW up to two million rows,
IVF-Flat above (its nlist = 4 sqrt(rows), trained on a seeded sample, 1/64 of the lists probed). Cosine indexes L2-normalised rows with
inner product; ``l2`` indexes the rows as they are. In the same run it records what the index costs and gives:
build time, file size and peak RSS, queries per second against the exact blockwise search
(:mod:`tasks.index.retrieval`, numpy) on the same queries, and recall@k, the share of the exact k nearest neighbours the
index returns. The queries are held out: up to ``queries`` rows of another split (test, else val) when the
experiment has one, else of the indexed split with each query's own row left out of both searches.

The index is written with ``faiss.write_index`` (FAISS's own binary format, never pickle) into
``indexes/<key>/index.faiss``, keyed by the split's feature key and these settings, with its sha256 in the result;
a second build is a hit once the file matches it (a damaged index is quarantined and built again).
``pip install 'transferpipe[index]'`` installs faiss-cpu.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import IndexFiles
from tasks.declare import Graph, Section, Stage, Unit, Work, against, check_layer, features, held_out
from tasks.result import StagePlan, StageResult

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


class IndexPlan(StagePlan):
    split: str
    features: str
    queries_from: str | None  # another split's feature key (held-out queries), or None: the split itself
    config: IndexConfig
    cache_dir: Path

    @property
    def files(self) -> IndexFiles:
        return IndexFiles(CacheLayout(self.cache_dir).index(self.key))

    @property
    def path(self) -> Path:
        return self.files.index


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
    spec = keys.index_spec(feature_key, queries_from, config.model_dump(mode="json", exclude={"split"}))
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


def _plan(config: Any, graph: Graph) -> list[Work]:
    split, wanted = features(graph), config.index or IndexConfig()
    name = wanted.split
    if name not in split:
        raise ValueError(f"--split {name!r}: no such split in this config; its splits: {', '.join(split)}")
    check_layer(config, "index.layer", wanted.layer)
    require_faiss()
    plan = plan_index(wanted, name, split[name].key, config.cache_dir, held_out(name, split))
    return [Work(name, plan, is_sound(plan))]


STAGE = Stage("index", _plan, "tasks.index.stage:build_index", "index", lambda c, w: f"index-{w.what}-{w.plan.config.kind}",
              after=("extract",), side_goal=True, why=against("index"), stored=is_stored,
              units=lambda w: [Unit(f"{w.what} {w.plan.config.kind} {w.plan.config.metric}", w.plan.key, w.stored,
                                    w.plan.spec)],
              section=Section("index", IndexConfig | None, Field(
                  None, description="transferpipe index: layer, metric, kind (its flags override)")))
