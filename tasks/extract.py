"""The extraction stage: frozen backbone over one split → one HDF5 feature file.

:func:`plan_extraction` is cheap (scan, fingerprint, key); :func:`extract_split`
is the stage. The store is the source of truth: a complete file for the key is
reused with no forward pass; otherwise, under the key's lock, the partial file
is resumed (or started) and completed. Batches are decoded by DataLoader
workers, run under ``inference_mode`` (AMP and channels_last on CUDA), and
written by a background thread while the next batch computes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import Timeout
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storage.faults import fault_point
from storage import inventory
from storage.features import FeatureStore
from storage.layout import CacheLayout
from storage.keys import feature_key, feature_spec, short
from tasks.backbones import BackboneConfig, BackboneSpec, FeatureExtractor, Preprocess, build, resolve
from tasks.runtime import pick_device, versions
from tasks.result import StageResult
from tasks.data import DECODE_ERRORS, BadImageError, DataConfig, Manifest, build_manifest, check_headers, load_rgb

log = logging.getLogger("transferpipe.extract")


class ExtractConfig(BaseModel):
    """``extract:`` section. Nothing here changes the features, so nothing here is in the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(128, ge=1, le=65536)
    dtype: Literal["float16", "float32"] = "float16"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int | Literal["auto"] = "auto"
    amp: bool = Field(True, description="autocast (bf16 where supported, else fp16) on CUDA")
    channels_last: bool = True

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
    spec = resolve(backbone)
    plans = {}
    for split, fp in manifest.fingerprints.items():
        fspec = feature_spec(**spec.key_fields(), dataset=fp, split=split, dtype=extract.dtype)
        plans[split] = SplitPlan(
            key=feature_key(fspec), split=split, spec=fspec, manifest=manifest_path,
            cache_dir=Path(cache_dir), backbone=spec, extract=extract, on_bad_image=data.on_bad_image,
        )
    return plans


def is_stored(plan: SplitPlan) -> bool:
    """Whether the store holds a complete, sound file for this plan (a bad one is quarantined)."""
    return FeatureStore(plan.cache_dir).lookup(plan.key) is not None


def extract_split(plan: SplitPlan) -> ExtractResult:
    """The stage: reuse the complete file for ``plan.key`` or compute (resume) it."""
    return extract_rows(plan, FeatureStore(plan.cache_dir), plan.key, plan.key, (0, None))


def extract_rows(plan: SplitPlan, store: FeatureStore, name: str, key: str, span: tuple[int, int | None]) -> ExtractResult:
    """Under ``name``'s lock in ``store``: reuse its complete file or compute rows ``span`` of the split."""
    started = time.perf_counter()
    path = store.lookup(name)
    if path is None:
        lock = store.lock(name)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another run is extracting %s; waiting for it", short(key))
            lock.acquire()
        try:
            path = store.lookup(name)  # the run we waited for may have finished it
            if path is None:
                return _compute(plan, store, started, name, key, span)
        finally:
            lock.release()
    return reuse(plan, store, path, started, key)


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


# --------------------------------------------------------------------------- compute


class _Images(Dataset):
    """Decodes one image to a uint8 (3, crop, crop) tensor; a failure is returned, not raised."""

    def __init__(self, root: Path, items: list[tuple[str, int]], preprocess: Preprocess, bad: dict[str, str]):
        self.root, self.items, self.preprocess, self.bad = root, items, preprocess, bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        rel = self.items[i][0]
        if rel in self.bad:
            return i, None, self.bad[rel]
        try:
            return i, self.preprocess(load_rgb(self.root / rel)), None
        except DECODE_ERRORS as exc:
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [x for _, x, _ in samples if x is not None]
    bad = [(i, err) for i, x, err in samples if x is None]
    return (torch.stack(good) if good else None), len(samples), bad


def worker_init(_worker_id: int) -> None:
    """Drop the parent's thread-exit hooks in a forked DataLoader worker.

    Prefect 3.8 registers one per service; after fork it resets the service but
    the hook stays and fails an assert at exit, so the worker exits with code 1
    and the DataLoader reports it as crashed. A worker never needs them.
    """
    import threading

    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def num_workers_for(setting: int | str, n_batches: int) -> int:
    """DataLoader workers: ``auto`` is 0 for tiny jobs, else cores - 1 (at most 8).

    A daemonic process (a Dask worker started with its default settings) may not
    have children, so it decodes in-process whatever the setting.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        if setting not in ("auto", 0):
            log.warning("num_workers=%s ignored: this process is daemonic (a Dask worker?) and cannot start "
                        "DataLoader workers; start the Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False",
                        setting)
        return 0
    if setting != "auto":
        return int(setting)
    if n_batches < 4:  # starting workers costs more than it saves
        return 0
    return min(8, max(1, (os.cpu_count() or 1) - 1))


class _Runner:
    """The frozen model on its device, with the CUDA speed-ups when they apply."""

    def __init__(self, spec: BackboneSpec, cfg: ExtractConfig) -> None:
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.channels_last = self.cuda and cfg.channels_last
        self.preprocess = spec.preprocess
        model: FeatureExtractor = build(spec).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.amp_dtype = None
        if self.cuda and cfg.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.dtype = getattr(torch, cfg.dtype)
        self.batches = 0

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(self.preprocess.normalize(x))
            out = {layer: t.float().to(self.dtype) for layer, t in out.items()}
        self.batches += 1
        for layer, t in out.items():
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"features of layer {layer!r} are not finite when stored as {self.dtype}; "
                    "set extract.dtype: float32, or check the backbone weights"
                )
        return {layer: t.cpu().numpy() for layer, t in out.items()}

    def dims(self) -> dict[str, int]:
        crop = self.preprocess.crop
        probe = torch.zeros(1, 3, crop, crop, dtype=torch.uint8)
        out = self(probe)
        self.batches -= 1
        return {layer: int(a.shape[1]) for layer, a in out.items()}


def _compute(
    plan: SplitPlan, store: FeatureStore, started: float, name: str, key: str, span: tuple[int, int | None]
) -> ExtractResult:
    manifest = Manifest.load(plan.manifest)
    items = manifest.splits[plan.split][span[0] : span[1]]
    runner = _Runner(plan.backbone, plan.extract)
    rows = {} if span == (0, None) else {"rows": f"{span[0]}:{span[0] + len(items)}"}
    with store.writer(
        name, spec=plan.spec, classes=manifest.classes, dims=runner.dims(), total=len(items),
        batch_size=plan.extract.batch_size, versions=versions(), attrs={"dataset_root": str(manifest.root), **rows},
    ) as writer:
        first = writer.position
        undecodable = _write_batches(plan, manifest.root, items, runner, writer)
        if undecodable:
            raise BadImageError(undecodable, f"the {plan.split} split of {manifest.root}")
        dropped = {s["path"] for s in writer.skipped}
        kept = [(p, y) for p, y in items if p not in dropped]
        path = writer.complete(np.array([y for _, y in kept], dtype=np.int64), [p for p, _ in kept])
    seconds = time.perf_counter() - started
    computed = len(items) - first
    log.info(
        "%s features for %s: %d images in %.1fs (%.0f img/s)%s → %s", plan.split, plan.backbone.name, computed,
        seconds, computed / max(seconds, 1e-9), f", {len(dropped)} skipped" if dropped else "", path,
    )
    for s in writer.skipped:
        log.warning("skipped %s: %s", s["path"], s["error"])
    return ExtractResult(
        key=key, split=plan.split, path=path, manifest=plan.manifest, rows=len(kept), dims=writer.dims,
        skipped=len(dropped), cache_hit=False, forward_batches=runner.batches, seconds=seconds,
    )


def _write_batches(plan: SplitPlan, root: Path, items: list[tuple[str, int]], runner: _Runner, writer) -> list:
    """Decode (workers), forward and append (a writer thread) every batch from the writer's position on.

    Returns the undecodable images with ``on_bad_image: error`` (then nothing after the first is computed).
    """
    cfg = plan.extract
    first, size = writer.position, writer.batch_size  # a resumed file keeps its batch size
    batches = [list(range(s, min(s + size, len(items)))) for s in range(first, len(items), size)]
    loader = DataLoader(
        _Images(root, items, plan.backbone.preprocess, check_headers(root, items)), batch_sampler=batches,
        num_workers=num_workers_for(cfg.num_workers, len(batches)), collate_fn=_collate, pin_memory=runner.cuda,
        worker_init_fn=worker_init,
    )
    empty = {layer: np.empty((0, d), dtype=cfg.dtype) for layer, d in writer.dims.items()}
    desc = f"extract {plan.backbone.name} {plan.split}"
    with ThreadPoolExecutor(1, thread_name_prefix="h5-writer") as io, tqdm(
        total=len(items), initial=first, unit="img", desc=desc, disable=None
    ) as bar:
        pending, undecodable = None, []
        for x, n, failed in loader:
            bar.update(n)
            skipped = [{"path": items[i][0], "error": err} for i, err in failed]
            if plan.on_bad_image == "error" and (skipped or undecodable):
                undecodable += skipped  # stop computing, keep decoding: the error lists every bad file
                continue
            feats = runner(x) if x is not None else empty
            fault_point("extract.batch")
            if pending is not None:
                pending.result()
            pending = io.submit(writer.append, feats, skipped)
        if pending is not None:
            pending.result()
    return undecodable
