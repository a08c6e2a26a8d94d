"""The extraction loop: decode (DataLoader workers) → forward (inference mode, channels_last, AMP on
CUDA) → append (a writer thread), batch by batch, piece after piece, resuming a partial piece at its last
flushed batch. One model and one set of decode workers serve every piece of the run.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storage.faults import fault_point
from storage.features import FeatureStore
from storage.keys import piece_key, piece_spec, tail_key
from tasks.backbones.config import BackboneSpec, Preprocess
from tasks.backbones.models import FeatureExtractor, build
from tasks.data.errors import BadImageError
from tasks.data.images import DECODE_ERRORS, num_workers_for, worker_init
from tasks.data.manifest import Manifest, check_headers
from tasks.extract.pieces import Piece
from tasks.extract.plan import ExtractConfig, SplitPlan
from tasks.machine import autocast_dtype, cpu_has_fast_bf16, pick_device, versions

log = logging.getLogger("transferpipe.extract")


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
    """The frozen model on its device, in channels_last memory format (on the CPU too: 1.3-1.5x there,
    ``benchmarks/gpu.py``) and autocast as planned.

    Every forward pass has the same shape: a short batch (a piece's last, or one with undecodable images) is
    padded with zero images to ``pad_to``. The kernels' summation order depends on the batch's shape, not on
    the other images in it, so an image's features are then the same bits whichever images share its batch
    and whichever source (folder, shards, table) cut the batches (measured: a different batch size changed
    the float32 features of 15 of 16 images; a fixed shape, 0, at every position in the batch).
    """

    def __init__(self, spec: BackboneSpec, cfg: ExtractConfig, precision: str) -> None:
        self.device = pick_device(cfg.device)
        self.channels_last = cfg.channels_last
        self.preprocess = spec.preprocess
        model: FeatureExtractor = build(spec).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.amp_dtype = autocast_dtype(precision, self.device)  # as planned: the precision is in the key
        if self.amp_dtype is not None and self.device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning("extract.cpu_bf16: no bf16 instructions (AVX512-BF16 or AMX) that oneDNN may use here (the CPU "
                        "lacks them, or DNNL_MAX_CPU_ISA caps them): bf16 is emulated, 2-25x slower than fp32 "
                        "(measured); set extract.cpu_bf16: false here")
        self.dtype = getattr(torch, cfg.dtype)
        self.batches = 0

    def __call__(self, x: torch.Tensor, pad_to: int, check: bool = True) -> dict[str, np.ndarray]:
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        n = x.shape[0]
        if n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        with torch.inference_mode(), autocast:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            full = {layer: t[:n].float() for layer, t in self.model(self.preprocess.normalize(x)).items()}
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
        out = self(probe, pad_to=1, check=False)
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


def compute_pieces(plan: SplitPlan, store: FeatureStore, pieces: list[Piece]) -> Computed:
    """Every piece in ``pieces`` that ``store`` lacks, each under its own lock, resuming its partial file.

    The model is built and the decode workers started once, when the first
    piece needs them. With ``on_bad_image: error`` nothing is completed after
    the first undecodable image, but every piece left is still decoded so the
    error lists them all.
    """
    manifest = Manifest.load(plan.manifest)
    items = manifest.splits[plan.split]
    todo = [p for p in pieces if store.lookup(p.key, mark=False) is None]
    if not todo:
        return Computed(rows=0, dims={}, skipped=0, forward_batches=0)
    started = time.perf_counter()
    runner = _Runner(plan.backbone, plan.extract, plan.spec["precision"])
    dims = runner.dims()
    wanted = [items[i] for p in todo for i in range(p.start, p.stop)]
    loader = _Loader(plan, manifest, items, check_headers(manifest, wanted), runner, dims, len(wanted))
    rows = skipped = computed = 0
    undecodable: list[dict[str, str]] = []
    made_by = versions()  # once: it reads package metadata
    with loader:
        for piece in todo:
            if undecodable:  # decode only, to name every bad image
                undecodable += loader.run(piece.start, piece.start, piece.stop, None)
                continue
            with _piece_lock(store, piece):
                if store.lookup(piece.key, mark=False) is not None:  # the run we waited for made it
                    continue
                span = items[piece.start : piece.stop]
                with store.writer(
                    piece.key, spec=piece_spec(plan.spec), classes=manifest.classes, dims=dims, total=len(span),
                    batch_size=plan.extract.batch_size, versions=made_by, attrs={"piece": piece.name},
                ) as writer:
                    if writer.position == 0:
                        _copy_from_tail(plan, manifest, store, piece, writer)
                    first = writer.position
                    undecodable += loader.run(piece.start, piece.start + first, piece.stop, writer)
                    if undecodable:
                        continue
                    dropped = {s["path"] for s in writer.skipped}
                    kept = [(p, y) for p, y in span if p not in dropped]
                    writer.complete(np.array([y for _, y in kept], dtype=np.int64), [p for p, _ in kept])
                if piece.stop == len(items):  # the split's open end: the next scan may append to it
                    store.remember_tail(_tail_key(plan, manifest, piece.start), piece.key, len(span))
                rows, skipped, computed = rows + len(kept), skipped + len(dropped), computed + len(span) - first
                for s in writer.skipped:
                    log.warning("skipped %s: %s", s["path"], s["error"])
    if undecodable:
        raise BadImageError(undecodable, f"the {plan.split} split of {manifest.root}")
    seconds = time.perf_counter() - started
    log.info("%s features for %s: %d images in %d piece(s), %.1fs (%.0f img/s)%s → %s", plan.split,
             plan.backbone.name, computed, len(todo), seconds, computed / max(seconds, 1e-9),
             f", {skipped} skipped" if skipped else "", store.root)
    return Computed(rows=rows, dims=dims, skipped=skipped, forward_batches=runner.batches)


def _identities(manifest: Manifest, split: str) -> list:
    """Each item's identity as the scan recorded it (size and mtime, or sha256; None where the source keeps none)."""
    return manifest.files.get(split) or [None] * len(manifest.splits[split])


def _tail_key(plan: SplitPlan, manifest: Manifest, start: int) -> str:
    return tail_key(plan.spec, manifest.splits[plan.split][start][0], _identities(manifest, plan.split)[start],
                    manifest.source, manifest.options)


def _copy_from_tail(plan: SplitPlan, manifest: Manifest, store: FeatureStore, piece: Piece, writer) -> None:
    """A piece that begins where a split's last piece began (a folder that gained files after it): the last
    piece's rows, copied, when its items are this piece's first ones, unchanged (its key, recomputed from them,
    says so). Features do not depend on what shares their batch, so the copy is the bytes extraction would write;
    only the new items go through the backbone (before: the whole piece did, about half a piece of old images)."""
    found = store.tail(_tail_key(plan, manifest, piece.start))
    if found is None or not 0 < found[1] < piece.rows:
        return
    key, count = found
    items = manifest.splits[plan.split][piece.start : piece.start + count]
    files = _identities(manifest, plan.split)[piece.start : piece.start + count]
    if piece_key(plan.spec, [p for p, _ in items], files, manifest.source, manifest.options) != key:
        return  # an item changed, or the split was cut differently
    if store.lookup(key, mark=False) is None:
        return
    old = store.read(key)
    writer.copy(old.features, old.skipped)
    log.info("%s: %d rows copied from the split's former last piece, %d to extract", piece.name, count,
             piece.rows - count)


@contextlib.contextmanager
def _piece_lock(store: FeatureStore, piece: Piece) -> Iterator[None]:
    """The piece's lock, waiting (and saying so) while another run extracts it."""
    from filelock import Timeout

    lock = store.lock(piece.key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another run is extracting %s; waiting for it", piece.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()

class Computed(NamedTuple):
    rows: int
    dims: dict[str, int]
    skipped: int
    forward_batches: int


class _Batches:
    """A batch sampler whose batches are set before each pass (one pass per piece; the workers persist)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Loader:
    """Decode workers over the split's items, kept alive across pieces, feeding the runner and a writer thread."""

    def __init__(self, plan: SplitPlan, manifest: Manifest, items: list[tuple[str, int]], bad: dict[str, str],
                 runner: _Runner, dims: dict[str, int], total: int) -> None:
        cfg = plan.extract
        self.plan, self.items, self.runner, self.sampler = plan, items, runner, _Batches()
        self.empty = {layer: np.empty((0, d), dtype=cfg.dtype) for layer, d in dims.items()}
        workers = num_workers_for(cfg.num_workers, -(-total // cfg.batch_size))
        self.loader = DataLoader(
            _Images(manifest, items, plan.backbone.preprocess, bad), batch_sampler=self.sampler,
            num_workers=workers, collate_fn=_collate, pin_memory=runner.device.type == "cuda", worker_init_fn=worker_init,
            persistent_workers=workers > 0,
        )
        self.bar = tqdm(total=total, unit="img", desc=f"extract {plan.backbone.name} {plan.split}", disable=None)
        self.io = ThreadPoolExecutor(1, thread_name_prefix="h5-writer")

    def __enter__(self) -> _Loader:
        return self

    def __exit__(self, *_: object) -> None:
        self.io.shutdown()
        self.bar.close()

    def run(self, start: int, first: int, stop: int, writer) -> list[dict[str, str]]:
        """Rows ``[first, stop)`` of the split (a piece from ``start``) into ``writer``, in batches that start at
        the piece's start (a resumed piece keeps its batches). Without a writer, or with ``on_bad_image: error``
        once an image fails, it only decodes: returns the undecodable images in that case."""
        size = writer.batch_size if writer is not None else self.plan.extract.batch_size
        self.sampler.batches = [list(range(s, min(s + size, stop))) for s in range(first, stop, size)]
        self.bar.update(first - start)
        pending, undecodable = None, []
        for x, n, failed in self.loader:
            self.bar.update(n)
            skipped = [{"path": self.items[i][0], "error": err} for i, err in failed]
            if writer is None or (self.plan.on_bad_image == "error" and (skipped or undecodable)):
                undecodable += skipped  # stop computing, keep decoding: the error lists every bad file
                continue
            feats = self.runner(x, pad_to=size) if x is not None else self.empty
            fault_point("extract.batch")
            if pending is not None:
                pending.result()
            pending = self.io.submit(writer.append, feats, skipped)
        if pending is not None:
            pending.result()
        return undecodable
