"""The extraction loop: decode (DataLoader workers) → forward (inference mode, AMP and channels_last on
CUDA) → append (a writer thread), batch by batch, resuming a partial file at its last flushed batch."""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storage.faults import fault_point
from storage.features import FeatureStore
from tasks.backbones import BackboneSpec, Preprocess
from tasks.data import DECODE_ERRORS, BadImageError, Manifest, check_headers
from tasks.data import num_workers_for, worker_init
from tasks.models import FeatureExtractor, build
from tasks.machine import autocast_dtype, pick_device, versions

log = logging.getLogger("transferpipe.extract")

if TYPE_CHECKING:
    from tasks.extract import ExtractConfig, SplitPlan


class _Images(Dataset):
    """Decodes one image to a uint8 (3, crop, crop) tensor; a failure is returned, not raised."""

    def __init__(self, manifest: Manifest, items: list[tuple[str, int]], preprocess: Preprocess, bad: dict[str, str]):
        self.manifest, self.items, self.preprocess, self.bad = manifest, items, preprocess, bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        rel = self.items[i][0]
        if rel in self.bad:
            return i, None, self.bad[rel]
        try:
            return i, self.preprocess(self.manifest.image(rel)), None
        except DECODE_ERRORS as exc:
            return i, None, f"{type(exc).__name__}: {exc}"


def _collate(samples: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [x for _, x, _ in samples if x is not None]
    bad = [(i, err) for i, x, err in samples if x is None]
    return (torch.stack(good) if good else None), len(samples), bad


class _Runner:
    """The frozen model on its device, with the CUDA speed-ups when they apply."""

    def __init__(self, spec: BackboneSpec, cfg: ExtractConfig, precision: str) -> None:
        self.device = pick_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.channels_last = self.cuda and cfg.channels_last
        self.preprocess = spec.preprocess
        model: FeatureExtractor = build(spec).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.amp_dtype = autocast_dtype(precision, self.device)  # as planned: the precision is in the key
        self.dtype = getattr(torch, cfg.dtype)
        self.batches = 0

    def __call__(self, x: torch.Tensor, check: bool = True) -> dict[str, np.ndarray]:
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            full = {layer: t.float() for layer, t in self.model(self.preprocess.normalize(x)).items()}
            out = {layer: t.to(self.dtype) for layer, t in full.items()}
        self.batches += 1
        for layer, t in out.items():
            if not torch.isfinite(t).all():
                raise ValueError(
                    f"features of layer {layer!r} are not finite when stored as {self.dtype}; "
                    "set extract.dtype: float32, or check the backbone weights"
                )
            if check and self.dtype == torch.float16:
                _check_float16_range(layer, full[layer])
        return {layer: t.cpu().numpy() for layer, t in out.items()}

    def dims(self) -> dict[str, int]:
        crop = self.preprocess.crop
        probe = torch.zeros(1, 3, crop, crop, dtype=torch.uint8)
        out = self(probe, check=False)
        self.batches -= 1
        return {layer: int(a.shape[1]) for layer, a in out.items()}


FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16: below it precision is lost


def _check_float16_range(layer: str, t: torch.Tensor) -> None:
    """Features mostly below float16's normal range would be stored as noise or zeros: refuse, say what to set."""
    values = t.abs()
    nonzero = values[values > 0]
    if nonzero.numel() and (nonzero < FLOAT16_TINY).float().mean() > 0.5:
        raise ValueError(
            f"features of layer {layer!r} are too small for float16 (largest |x| = {float(values.max()):.2g}, "
            f"float16 keeps precision down to {FLOAT16_TINY:.2g}): stored as float16 they would be lost. "
            "Set extract.dtype: float32 (random initialisation of some networks, e.g. EfficientNet, does this)"
        )


def compute(plan: SplitPlan, store: FeatureStore, started: float, name: str, span: tuple[int, int | None]) -> Computed:
    """Rows ``span`` of the split into ``name``'s file in ``store`` (resuming its partial file)."""
    manifest = Manifest.load(plan.manifest)
    items = manifest.splits[plan.split][span[0] : span[1]]
    runner = _Runner(plan.backbone, plan.extract, plan.spec["precision"])
    rows = {} if span == (0, None) else {"rows": f"{span[0]}:{span[0] + len(items)}"}
    with store.writer(
        name, spec=plan.spec, classes=manifest.classes, dims=runner.dims(), total=len(items),
        batch_size=plan.extract.batch_size, versions=versions(), attrs={"dataset_root": str(manifest.root), **rows},
    ) as writer:
        first = writer.position
        undecodable = _write_batches(plan, manifest, items, runner, writer)
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
    return Computed(path=path, rows=len(kept), dims=writer.dims, skipped=len(dropped), forward_batches=runner.batches)


class Computed(NamedTuple):
    path: Path
    rows: int
    dims: dict[str, int]
    skipped: int
    forward_batches: int


def _write_batches(plan: SplitPlan, manifest: Manifest, items: list[tuple[str, int]], runner: _Runner, writer) -> list:
    """Decode (workers), forward and append (a writer thread) every batch from the writer's position on.

    Returns the undecodable images with ``on_bad_image: error`` (then nothing after the first is computed).
    """
    cfg = plan.extract
    first, size = writer.position, writer.batch_size  # a resumed file keeps its batch size
    batches = [list(range(s, min(s + size, len(items)))) for s in range(first, len(items), size)]
    loader = DataLoader(
        _Images(manifest, items, plan.backbone.preprocess, check_headers(manifest, items)),
        batch_sampler=batches,
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
