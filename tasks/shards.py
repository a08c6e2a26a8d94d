"""Extraction sharded over workers: whole-batch shards of a split, each to its own file, then joined.

Each shard is extracted (resumable, locked) exactly like a whole split, into
``shards/<feature key>/``; the join makes the split's usual feature file from
them without copying (:mod:`storage.shard_join`), so every later stage reads it
like any other. Shards are whole batches, so the features equal one process's.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from storage.features import FeatureStore
from storage.keys import shard_key
from storage.shard_join import join_shards as join_files
from tasks.data import Manifest
from tasks.extract import ExtractResult, SplitPlan, extract_rows, reuse
from tasks.machine import versions


class ShardPlan(BaseModel):
    """Rows ``[start, stop)`` of one split, whole batches, extracted by one worker to its own file."""

    model_config = ConfigDict(frozen=True)

    split: SplitPlan
    index: int
    count: int
    start: int
    stop: int

    @property
    def part(self) -> str:
        """The shard's name in ``shards/<feature key>/``."""
        return f"{self.start:08d}-{self.stop:08d}"

    @property
    def key(self) -> str:
        return shard_key(self.split.key, self.start, self.stop)


class JoinPlan(BaseModel):
    """Shards to join, in order, into the split's feature file."""

    model_config = ConfigDict(frozen=True)

    split: SplitPlan
    parts: list[str]

    @property
    def key(self) -> str:
        return self.split.key


def plan_shards(plan: SplitPlan, count: int) -> list[ShardPlan]:
    """Up to ``count`` shards of whole batches, so every batch is the one a single process would run."""
    n = len(Manifest.load(plan.manifest).splits[plan.split])
    size = plan.extract.batch_size
    batches = -(-n // size)
    count = max(1, min(count, batches))
    bounds = [round(i * batches / count) for i in range(count + 1)]
    return [
        ShardPlan(split=plan, index=i, count=count, start=bounds[i] * size, stop=min(bounds[i + 1] * size, n))
        for i in range(count)
    ]


def extract_shard(shard: ShardPlan) -> ExtractResult:
    """One shard to ``shards/<key>/<start>-<stop>.h5``: resumable and locked like a whole split."""
    plan = _worker_device(shard.split)
    store = FeatureStore(plan.cache_dir).shards(plan.key)
    return extract_rows(plan, store, shard.part, shard.key, (shard.start, shard.stop))


def _worker_device(plan: SplitPlan) -> SplitPlan:
    """On a Dask worker of a machine with several GPUs, worker N uses GPU N mod count.

    (Workers started one per GPU with their own CUDA_VISIBLE_DEVICES, as dask-cuda
    does, each see one device and keep ``cuda``.)
    """
    import torch

    if plan.extract.device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return plan
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return plan
    index = name if isinstance(name, int) else 0
    device = f"cuda:{index % torch.cuda.device_count()}"
    return plan.model_copy(update={"extract": plan.extract.model_copy(update={"device": device})})


def join_shards(plan: JoinPlan) -> ExtractResult:
    """The split's feature file from its shards (HDF5 virtual datasets, no copy), under the split's lock."""
    started = time.perf_counter()
    split = plan.split
    store = FeatureStore(split.cache_dir)
    with store.lock(split.key):
        path = store.lookup(split.key)
        if path is None:
            manifest = Manifest.load(split.manifest)
            path = join_files(
                store, split.key, plan.parts, spec=split.spec, classes=manifest.classes, versions=versions(),
                batch_size=split.extract.batch_size, attrs={"dataset_root": str(manifest.root)},
            )
    return reuse(split, store, path, started, split.key, hit=False)
