"""Extraction over Dask workers: a split's missing pieces dealt in groups of whole pieces, then joined.

Each group is one worker's task (cached, retryable); the pieces land in the
cache's ``features/pieces/`` exactly as one process writes them, and the join
makes the split's usual file.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from storage.features import FeatureStore
from storage.keys import piece_group_key
from tasks.extract.pieces import Piece
from tasks.extract.plan import ExtractResult, SplitPlan
from tasks.extract.stage import extract_pieces, join, missing, reuse


class PieceGroup(BaseModel):
    """Whole pieces of one split, extracted by one Dask worker."""

    model_config = ConfigDict(frozen=True)

    split: SplitPlan
    pieces: list[Piece]
    index: int
    count: int

    @property
    def key(self) -> str:
        return piece_group_key(self.split.key, [p.key for p in self.pieces])


def plan_groups(plan: SplitPlan, count: int) -> list[PieceGroup]:
    """The split's missing pieces in up to ``count`` groups of about equal rows (whole pieces, in order)."""
    todo = missing(plan)
    count = max(1, min(count, len(todo)))
    total, groups, current, filled = sum(p.rows for p in todo), [], [], 0
    for j, piece in enumerate(todo):
        current.append(piece)
        filled += piece.rows
        groups_left, pieces_left = count - len(groups) - 1, len(todo) - j - 1
        if groups_left and (filled >= total * (len(groups) + 1) / count or pieces_left == groups_left):
            groups.append(current)
            current = []
    groups.append(current)
    return [PieceGroup(split=plan, pieces=g, index=i, count=len(groups)) for i, g in enumerate(groups)]


def extract_group(group: PieceGroup) -> ExtractResult:
    """One worker's pieces (on a machine with several GPUs, worker N uses GPU N mod count)."""
    return extract_pieces(worker_device(group.split), group.pieces)


def join_group(plan: SplitPlan) -> ExtractResult:
    """The split's feature file from its pieces, after the workers computed them (under the split's lock)."""
    started = time.perf_counter()
    store = FeatureStore(plan.cache_dir)
    with store.lock(plan.key):
        path = store.lookup(plan.key) or join(plan)
    return reuse(plan, store, path, started, plan.key, hit=False)


def worker_device(plan: SplitPlan) -> SplitPlan:
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
