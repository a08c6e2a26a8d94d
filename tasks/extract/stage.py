"""The extraction stage: frozen backbone over one split → one HDF5 feature file (the loop: extract_loop.py).

:func:`plan_extraction` is cheap (scan, fingerprint, key); :func:`extract_split`
is the stage. The store is the source of truth: a complete file for the key is
reused with no forward pass; otherwise, under the key's lock, the split's
pieces that are not stored are computed (a partial piece resumes) and joined
(:mod:`tasks.extract.pieces`: a dataset that grows extracts only its new pieces).
Batches are decoded by DataLoader workers, run under ``inference_mode`` (channels_last;
AMP on CUDA), and written by a background thread while the next
batch computes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from filelock import Timeout

from storage import inventory
from storage.features import CorruptFeatureFile, FeatureStore
from storage.keys import short
from storage.piece_join import join_pieces
from tasks.data.errors import BadImageError
from tasks.data.manifest import Manifest
from tasks.extract.pieces import Piece
from tasks.extract.plan import ExtractResult, SplitPlan, store_of
from tasks.machine import versions

log = logging.getLogger("transferpipe.extract")


def extract_split(plan: SplitPlan) -> ExtractResult:
    """The stage: reuse the complete file for ``plan.key``, or compute the pieces it lacks and join them."""
    started = time.perf_counter()
    store = FeatureStore(plan.cache_dir)
    path = store.lookup(plan.key)
    if path is not None:
        return reuse(plan, store, path, started, plan.key)
    lock = store.lock(plan.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another run is extracting %s; waiting for it", short(plan.key))
        lock.acquire()
    try:
        path = store.lookup(plan.key)  # the run we waited for may have finished it
        if path is not None:
            return reuse(plan, store, path, started, plan.key)
        done = extract_pieces(plan)
        try:
            path = join(plan)
        except CorruptFeatureFile as exc:  # a stored piece failed its checksums: it was set aside; recompute it
            log.warning("%s; recomputing", exc)
            again = extract_pieces(plan)
            done = done.model_copy(update={"forward_batches": done.forward_batches + again.forward_batches})
            path = join(plan)
    finally:
        lock.release()
    result = reuse(plan, store, path, started, plan.key, hit=False)
    return result.model_copy(update={"forward_batches": done.forward_batches, "cache_hit": False})


def extract_pieces(plan: SplitPlan, pieces: list[Piece] | None = None) -> ExtractResult:
    """Compute the given pieces of the split (default: all) that are not stored; resumable, one lock each."""
    from tasks.extract.loop import compute_pieces

    started = time.perf_counter()
    done = compute_pieces(plan, store_of(plan), list(plan.pieces if pieces is None else pieces))
    return ExtractResult(key=plan.key, split=plan.split, path=store_of(plan).root, manifest=plan.manifest,
                         rows=done.rows, dims=done.dims, skipped=done.skipped, forward_batches=done.forward_batches,
                         cache_hit=done.forward_batches == 0, seconds=time.perf_counter() - started)


def reuse(plan: SplitPlan, store: FeatureStore, path: Path, started: float, key: str, hit: bool = True) -> ExtractResult:
    """The result for a complete file: its rows and widths, and the images it left out."""
    info = inventory.info(store, path)
    rows, dims, skipped = info.rows, info.dims, list(info.skipped)
    if skipped and plan.on_bad_image == "error":
        raise BadImageError(skipped, f"the {plan.split} split (cached as {path.name})")
    log.info("%s features for %s: %s %s", plan.split, plan.backbone.name, "cache hit" if hit else "joined", path)
    return ExtractResult(
        key=key, split=plan.split, path=path, manifest=plan.manifest, rows=rows, dims=dims, skipped=len(skipped),
        cache_hit=hit, forward_batches=0, seconds=time.perf_counter() - started,
    )


def missing(plan: SplitPlan) -> list[Piece]:
    """The plan's pieces that have no complete file (a cheap check: the file is there)."""
    store = store_of(plan)
    return [p for p in plan.pieces if not store.path(p.key).exists()]


def join(plan: SplitPlan, manifest: Manifest | None = None) -> Path:
    """The split's feature file from its (complete) pieces; its ``skipped`` names what the pieces could not
    decode and what the scan left out of the split. Use under the split's lock."""

    manifest = manifest or Manifest.load(plan.manifest)
    pieces = store_of(plan)
    return join_pieces(
        FeatureStore(plan.cache_dir), plan.key, [pieces.path(p.key) for p in plan.pieces],
        dict(manifest.splits[plan.split]), spec=plan.spec, classes=manifest.classes, versions=versions(),
        batch_size=plan.extract.batch_size, attrs={"dataset_root": str(manifest.root)},
        left_out=manifest.left_out.get(plan.split, []),
    )
