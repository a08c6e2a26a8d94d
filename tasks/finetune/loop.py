"""Fine-tuning, the training itself: model surgery (freeze, discriminative learning rates, LP-FT head),
seeded augmentation, one epoch at a time with a checkpoint after each, resumable.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from storage import checkpoints
from storage.checkpoints import RunFiles
from storage.faults import fault_point
from storage.keys import canonical_json, short
from tasks.backbones.config import Preprocess
from tasks.backbones.models import classifier, load_model
from tasks.data.images import num_workers_for, worker_init
from tasks.data.manifest import Manifest
from tasks.finetune.plan import FinetuneConfig, FinetunePlan
from tasks.finetune.surgery import (
    build_optimizer,
    build_schedule,
    freeze,
    init_head_from_probe,
    set_train_mode,
    unfrozen_modules,
)
from tasks.heads.stage import best_probe
from tasks.machine import autocast_dtype, pick_device

log = logging.getLogger("transferpipe.finetune")


class _TrainImages(Dataset):
    """Decoded, augmented uint8 crops; each sample's randomness is seeded by (seed, epoch, index)."""

    def __init__(self, manifest: Manifest, items, pre: Preprocess, augment: str, seed: int) -> None:
        self.manifest, self.items, self.pre, self.augment, self.seed = manifest, items, pre, augment, seed
        self.epoch = 0
        self.crop = RandomResizedCrop(pre.crop, scale=(0.25, 1.0), interpolation=InterpolationMode(pre.interpolation))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        img = self.manifest.image(rel)
        if self.augment == "none":
            return self.pre(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            img = TF.resize(img, [self.pre.resize], interpolation=InterpolationMode(self.pre.interpolation), antialias=True)
            img = self.crop(img)
            if self.augment == "standard" and torch.rand(()) < 0.5:
                img = TF.horizontal_flip(img)
        return TF.pil_to_tensor(img), label


def _loader(dataset, batch_size, shuffle_seed, workers, pin) -> DataLoader:
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=workers, pin_memory=pin, worker_init_fn=worker_init)


class Trained(NamedTuple):
    """What a finished run did: its progress state (history, best epoch), where it resumed, parameter counts."""

    state: dict[str, Any]
    resumed_from: int
    trainable_params: int
    frozen_params: int


def train(plan: FinetunePlan, files: RunFiles) -> Trained:
    """Train (resuming from ``last.pt`` when an earlier attempt left one) until the last epoch or early stop."""
    with deterministic_kernels():
        run = _setup(plan)
        resumed_from = _resume(run, files.last)
        if not run.state["history"] and plan.finetune.init_head == "best_probe":
            _end_epoch(run, files, _probe_epoch(run))  # the probe is the first candidate: never end below it
        for epoch in range(run.state["epoch"] + 1, plan.finetune.epochs + 1):
            if _end_epoch(run, files, _train_epoch(run, epoch)):
                break
    trainable = sum(p.numel() for p in run.params)
    return Trained(run.state, resumed_from, trainable, sum(p.numel() for p in run.model.parameters()) - trainable)


@contextlib.contextmanager
def deterministic_kernels():
    """Kernels that give the same result every run (cuDNN's deterministic convolutions, no autotuning), so
    a resumed run reaches the same weights as an uninterrupted one on a GPU too; torch's settings are restored
    after. On the CPU torch's kernels are deterministic already. ``CUBLAS_WORKSPACE_CONFIG`` takes effect
    where cuBLAS starts after it (a fresh process: the stage's own, a Prefect task's)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


@dataclass
class _Run:
    """One fine-tuning run while it trains: model, data, optimiser and the progress that a checkpoint saves."""

    plan: FinetunePlan
    classes: list[str]
    device: torch.device
    model: nn.Module
    params: list[nn.Parameter]
    frozen_bn: list[str]
    train_set: _TrainImages
    val_set: _TrainImages
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    workers: int
    state: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []})

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()


def _setup(plan: FinetunePlan) -> _Run:
    """The model (probe head for LP-FT, frozen blocks), data, optimiser, schedule and AMP of a fresh run."""
    cfg = plan.finetune
    manifest = Manifest.load(plan.manifest)
    if "val" not in manifest.splits:
        raise ValueError("fine-tuning needs a val split for model selection and early stopping; set data.val_fraction > 0")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(plan.backbone, num_classes=len(manifest.classes))
    head = classifier(plan.backbone, model)
    if cfg.init_head == "best_probe":
        if not plan.probes:
            raise ValueError(
                "finetune.init_head is best_probe but no linear probe was trained: add a logistic or linear head "
                "(penultimate layer, shots including all, preprocess none or standardize), or set init_head: random"
            )
        init_head_from_probe(model, head, plan.cache_dir, best_probe(plan.cache_dir, plan.probes))
    params, frozen_bn = freeze(model, unfrozen_modules(model, cfg, head))
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    pre = plan.backbone.preprocess
    train_set = _TrainImages(manifest, manifest.splits["train"], pre, cfg.augment, cfg.seed)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    opt = build_optimizer(model, head, cfg)
    amp_dtype = autocast_dtype(plan.spec["precision"], device)  # as planned: the precision is in the key
    return _Run(
        plan=plan, classes=manifest.classes, device=device, model=model, params=params, frozen_bn=frozen_bn,
        train_set=train_set, val_set=_TrainImages(manifest, manifest.splits["val"], pre, "none", cfg.seed),
        opt=opt, sched=build_schedule(opt, cfg, steps), amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        workers=num_workers_for(cfg.num_workers, steps),
    )


def _resume(run: _Run, last: Path) -> int:
    """Continue from ``last.pt`` if an earlier attempt left one; returns the epochs it had done."""
    if not last.exists():
        return 0
    try:
        ckpt = checkpoints.load(last)
    except checkpoints.CorruptCheckpoint as exc:
        RunFiles(last.parent).discard(str(exc), only=(last,))
        log.warning("starting fine-tuning %s from the beginning", short(run.plan.key))
        return 0
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["schedule"])
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if run.cuda and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    run.state = json.loads(ckpt["state"])
    log.info("resuming fine-tuning %s after epoch %d", short(run.plan.key), run.state["epoch"])
    return run.state["epoch"]


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One pass over the training split, then validation."""
    cfg, model, pre = run.plan.finetune, run.model, run.plan.backbone.preprocess
    run.train_set.epoch = epoch
    loader = _loader(run.train_set, cfg.batch_size, hash((cfg.seed, epoch)) & 0x7FFFFFFF, run.workers, run.cuda)
    set_train_mode(model, run.frozen_bn, cfg.freeze_bn)
    t0, seen, total_loss = time.perf_counter(), 0, 0.0
    bar = tqdm(loader, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="batch", disable=None, leave=False)
    for x, y in bar:
        x = x.to(run.device, non_blocking=True)
        y = y.to(run.device, non_blocking=True)
        if run.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            loss = nn.functional.cross_entropy(model(pre.normalize(x)), y)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        seen += len(y)
        batch_loss = loss.item()
        total_loss += batch_loss * len(y)
        bar.set_postfix(loss=f"{batch_loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        fault_point("finetune.batch")
    seconds = time.perf_counter() - t0
    val_loss, val_acc = validate(model, run.val_set, cfg.batch_size, run.device, run.workers, run.autocast)
    lrs = {g["name"]: g["lr"] for g in run.opt.param_groups}
    entry = {"epoch": epoch, "train_loss": total_loss / seen, "val_loss": val_loss, "val_accuracy": val_acc,
             "images_per_s": seen / seconds, "seconds": seconds, "lr_backbone": lrs.get("backbone", 0.0),
             "lr_head": lrs["head"]}
    log.info("epoch %d: loss %.4f, val acc %.4f, val loss %.4f, %.0f img/s", epoch, entry["train_loss"], val_acc,
             val_loss, entry["images_per_s"])
    return entry


def _probe_epoch(run: _Run) -> dict[str, float | None]:
    """Epoch 0: the model as LP-FT starts it (the frozen backbone and the best probe as its head), validated
    like every epoch. It is the first candidate for ``best.pt``, so fine-tuning never returns a model worse
    on validation than the probe it started from: when no epoch beats it, ``best_epoch`` is 0."""
    cfg = run.plan.finetune
    t0 = time.perf_counter()
    val_loss, val_acc = validate(run.model, run.val_set, cfg.batch_size, run.device, run.workers, run.autocast)
    log.info("epoch 0 (the probe): val acc %.4f, val loss %.4f", val_acc, val_loss)
    lrs = {g["name"]: g["lr"] for g in run.opt.param_groups}
    return {"epoch": 0, "train_loss": None, "val_loss": val_loss, "val_accuracy": val_acc, "images_per_s": 0.0,
            "seconds": time.perf_counter() - t0, "lr_backbone": lrs.get("backbone", 0.0), "lr_head": lrs["head"]}


def _end_epoch(run: _Run, files: RunFiles, entry: dict[str, float]) -> bool:
    """Record the epoch, save ``best.pt`` if it is the best so far and ``last.pt`` always; True: stop early."""
    cfg, state = run.plan.finetune, run.state
    state["history"].append(entry)
    epoch = int(entry["epoch"])
    score = entry["val_accuracy"] if _metric(cfg) == "val_accuracy" else -entry["val_loss"]
    if state["best"] is None or score > state["best"]:
        state.update(best=score, best_epoch=epoch, bad_epochs=0)
        checkpoints.save_best(files.best, run.model.state_dict(), backbone=run.plan.backbone.name,
                              classes=canonical_json(run.classes), epoch=epoch, val_accuracy=entry["val_accuracy"])
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    checkpoints.save({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                      "schedule": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
                      "rng": _rng_state(run.device), "state": json.dumps(state)}, files.last)
    fault_point("finetune.epoch")
    stop = bool(cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping.patience)
    if stop:
        log.info("early stopping after epoch %d (no %s improvement for %d epochs)", epoch, _metric(cfg),
                 state["bad_epochs"])
    return stop


def _metric(cfg: FinetuneConfig) -> str:
    return cfg.early_stopping.metric if cfg.early_stopping else "val_accuracy"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def validate(model, dataset, batch_size, device, workers, autocast) -> tuple[float, float]:
    """Validation loss and accuracy (eval mode, no augmentation)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.inference_mode():
        for x, y in _loader(dataset, batch_size, None, workers, device.type == "cuda"):
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(dataset.pre.normalize(x)).float()
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return loss_sum / n, correct / n
