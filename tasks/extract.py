"""The extraction stage: frozen backbone over one split → one HDF5 feature file (the loop: extract_loop.py).

:func:`plan_extraction` is cheap (scan, fingerprint, key); :func:`extract_split`
is the stage. The store is the source of truth: a complete file for the key is
reused with no forward pass; otherwise, under the key's lock, the split's
pieces that are not stored are computed (a partial piece resumes) and joined
(:mod:`tasks.pieces`: a dataset that grows extracts only its new pieces).
Batches are decoded by DataLoader workers, run under ``inference_mode`` (channels_last;
AMP on CUDA), and written by a background thread while the next
batch computes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from filelock import Timeout
from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import inventory
from storage.features import CorruptFeatureFile, FeatureStore
from storage.layout import CacheLayout
from storage.keys import feature_key, feature_spec, short
from tasks.backbones.config import BackboneConfig, BackboneSpec, resolve
from tasks.result import StageResult
from tasks.machine import forward_precision
from tasks.data.errors import BadImageError
from tasks.data.config import DataConfig
from tasks.data.manifest import build_manifest
from tasks.pieces import Piece, join, plan_pieces, store_of

log = logging.getLogger("transferpipe.extract")


class ExtractConfig(BaseModel):
    """``extract:`` section. Of these, ``dtype`` (storage) and the precision that ``device`` and ``amp`` give
    (:func:`tasks.machine.forward_precision`) are in the feature key; workers do not change the features, and
    batch size and channels_last only choose the kernels (every forward pass is padded to ``batch_size`` rows),
    whose sums may differ in the last bit: left out of the key on purpose, so another batch size reuses the
    cached bytes. With one setting, an image's features are the same bits whatever shares its batch and
    whichever source cut the batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(128, ge=1, le=65536)
    dtype: Literal["float16", "float32"] = "float16"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int | Literal["auto"] = "auto"
    amp: bool = Field(True, description="autocast (bf16 where supported, else fp16) on CUDA")
    channels_last: bool = Field(True, description="the model and batches in channels_last memory format, on any "
                                                   "device (the CPU too: 1.3-1.5x for ResNets)")
    piece_size: int = Field(1024, ge=1, le=1 << 24, description=(
        "images per cached piece on average (content-defined cuts; WebDataset: a piece is a shard): smaller "
        "pieces re-extract less when a folder or table grows, at more files"))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"num_workers must be >= 0 or 'auto', got {v}")
        return v


class SplitPlan(BaseModel):
    """Everything the stage needs for one split; small, so it can cross a task boundary."""

    model_config = ConfigDict(frozen=True)

    key: str
    split: str
    spec: dict[str, Any]
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    extract: ExtractConfig
    on_bad_image: Literal["error", "skip"]
    pieces: tuple[Piece, ...]


class ExtractResult(StageResult):
    """What the stage returns: where the features are, and what it cost."""

    work_fields: tuple[str, ...] = ("forward_batches",)
    key: str
    split: str
    path: Path
    manifest: Path
    rows: int
    dims: dict[str, int]
    skipped: int
    forward_batches: int


def plan_extraction(
    data: DataConfig, backbone: BackboneConfig, extract: ExtractConfig, cache_dir: Path
) -> dict[str, SplitPlan]:
    """Scan the dataset, resolve the backbone, and compute one feature key per split (by split name)."""
    manifest = build_manifest(data, cache_dir)
    manifest_path = manifest.save(CacheLayout(cache_dir).manifest(manifest.dataset_id))
    spec = resolve(backbone, cache_dir)
    precision = forward_precision(extract.device, extract.amp)
    plans = {}
    for split, fp in manifest.fingerprints.items():
        fspec = feature_spec(**spec.key_fields(), dataset=fp, split=split, dtype=extract.dtype, precision=precision)
        plans[split] = SplitPlan(
            key=feature_key(fspec), split=split, spec=fspec, manifest=manifest_path,
            cache_dir=Path(cache_dir), backbone=spec, extract=extract, on_bad_image=data.on_bad_image,
            pieces=plan_pieces(manifest, split, fspec, extract.piece_size),
        )
    return plans


def is_stored(plan: SplitPlan) -> bool:
    """Whether the store holds a complete, sound file for this plan (a bad one is quarantined)."""
    return FeatureStore(plan.cache_dir).lookup(plan.key) is not None


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
    from tasks.extract_loop import compute_pieces

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
