"""Partial fine-tuning end to end: unfreeze chosen blocks, discriminative learning rates, LP-FT.

The only stage that trains the backbone, so the one made resumable: a
checkpoint (model, optimiser, schedule, scaler, epoch, RNG, best so far,
history) is written atomically after every epoch to
``<cache_dir>/finetune/<key>/last.pt``; a retried or rerun stage continues
from it, and with deterministic settings reaches the same weights as an
uninterrupted run (per-epoch seeded shuffles, per-sample seeded augmentation).
The best epoch (by the validation metric) is saved as ``best.pt`` in the
transferpipe checkpoint format, which another experiment can name as its
``backbone.weights``. ``result.json``, written last, marks a finished run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2 import RandomResizedCrop
from tqdm.auto import tqdm

from storage.artifacts import load_head_arrays
from storage.faults import fault_point
from storage.keys import canonical_json, fingerprint
from tasks.backbones import CHECKPOINT_FORMAT, BackboneSpec, Preprocess, final_linear, load_model
from tasks.data import Manifest, load_rgb
from tasks.devices import pick_device
from tasks.extract import num_workers_for, worker_init
from tasks.head_stage import LINEAR_PROBES
from tasks.stage import StageResult

log = logging.getLogger("transferpipe.finetune")


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    patience: int = Field(3, ge=1)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"


class FinetuneConfig(BaseModel):
    """``finetune:`` section (off by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    unfreeze: list[str] | Literal["all"] = Field(default_factory=lambda: ["layer4"])
    last_n: int | None = Field(None, ge=1, description="unfreeze the last N top-level blocks instead of naming them")
    freeze_bn: bool | Literal["all"] = Field(
        True, description="true: frozen blocks' batch-norm stays in eval mode; all: every batch-norm does (LP-FT); "
        "false: all batch-norm layers update their statistics"
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr_head: float = Field(1e-3, gt=0)
    lr_backbone: float = Field(1e-4, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    init_head: Literal["best_probe", "random"] = "best_probe"
    augment: Literal["standard", "crop", "none"] = Field(
        "standard", description="standard: random resized crop + horizontal flip; crop: no flip (digits, text)"
    )
    early_stopping: EarlyStopping | None = EarlyStopping()
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int | Literal["auto"] = "auto"

    @field_validator("unfreeze")
    @classmethod
    def _names(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("unfreeze needs module names, 'all', or use last_n")
        return v


class FinetunePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    backbone: BackboneSpec
    manifest: Path
    cache_dir: Path
    finetune: FinetuneConfig
    probe_key: str | None = Field(None, description="LP-FT: the artifact key of the best linear probe")


class EpochLog(BaseModel):
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    images_per_s: float
    seconds: float = 0.0  # absent in results written before it was recorded
    lr_backbone: float
    lr_head: float


class FinetuneResult(StageResult):
    work_fields: tuple[str, ...] = ("epochs_run",)
    key: str
    best_checkpoint: Path
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    resumed_from: int
    history: list[EpochLog]
    trainable_params: int
    frozen_params: int
    train_seconds: float = 0.0  # all epochs, resumed ones included; kept on cache hits


def plan_finetune(cfg: FinetuneConfig, backbone: BackboneSpec, manifest: Path, cache_dir: Path,
                  feature_keys: dict[str, str], probe_key: str | None) -> FinetunePlan:
    """Key: feature inputs (backbone + split fingerprints) + finetune config + LP-FT head identity."""
    probe_key = probe_key if cfg.init_head == "best_probe" else None
    key = fingerprint({"kind": "finetune", "backbone": backbone.key_fields(), "features": feature_keys,
                       "finetune": cfg.model_dump(exclude={"enabled", "device", "num_workers"}), "probe": probe_key})
    return FinetunePlan(key=key, backbone=backbone, manifest=manifest, cache_dir=Path(cache_dir), finetune=cfg,
                        probe_key=probe_key)


def run_dir(plan: FinetunePlan) -> Path:
    return plan.cache_dir / "finetune" / plan.key


def is_stored(plan: FinetunePlan) -> bool:
    return (run_dir(plan) / "result.json").is_file() and (run_dir(plan) / "best.pt").is_file()


# --------------------------------------------------------------------------- model surgery


def unfrozen_modules(model: nn.Module, cfg: FinetuneConfig, head: str) -> list[str]:
    """Names of the modules to train (the classifier always trains)."""
    top = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if cfg.unfreeze == "all":
        return [name for name, _ in model.named_children()]
    if cfg.last_n is not None:
        blocks = [name for name in top if not head.startswith(name)]
        return blocks[-cfg.last_n :] + [head]
    names = dict(model.named_modules())
    bad = [n for n in cfg.unfreeze if n not in names]
    if bad:
        raise ValueError(
            f"finetune.unfreeze: unknown module(s) {bad}; top-level modules of this backbone: "
            f"{', '.join(n for n, _ in model.named_children())} (dotted names reach inside)"
        )
    return list(cfg.unfreeze) + [head]


def freeze(model: nn.Module, trainable: list[str]) -> tuple[list[nn.Parameter], list[str]]:
    """requires_grad only inside ``trainable``; returns the trainable parameters and frozen BN module names."""
    model.requires_grad_(False)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)
    inside = lambda n: any(n == t or n.startswith(t + ".") for t in trainable)  # noqa: E731
    frozen_bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not inside(n)]
    return [p for p in model.parameters() if p.requires_grad], frozen_bn


def set_train_mode(model: nn.Module, frozen_bn: list[str], freeze_bn: bool | str) -> None:
    """Train mode, except batch-norm kept in eval mode (running statistics used, not updated).

    ``all`` matters for LP-FT: the probe was fitted on eval-mode features, and
    batch statistics of a shifted target domain move every feature it relies
    on (measured on the demo: start loss 31 and val 0.90 instead of 0.08 and 0.93).
    """
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (freeze_bn == "all" or (freeze_bn and name in frozen_bn)):
            module.eval()


def build_optimizer(model: nn.Module, head: str, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW with discriminative learning rates: one group for the head, one for the backbone."""
    head_params = [p for p in model.get_submodule(head).parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": cfg.lr_head, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def init_head_from_probe(model: nn.Module, head: str, cache_dir: Path, probe_key: str) -> None:
    """LP-FT: the classifier starts as the probe, folded back to raw features.

    A probe trained on standardised features z = (x - mean) / scale computes
    W z + b = (W / scale) x + (b - (W / scale) mean).
    """
    meta, arrays = load_head_arrays(cache_dir, probe_key)
    if meta["kind"] not in LINEAR_PROBES or meta["params"]["preprocess"] == "l2":
        raise ValueError(f"head {probe_key[:12]} ({meta['kind']}, {meta['params']['preprocess']}) is not a linear probe")
    layer = model.get_submodule(head)
    W = arrays["coef_"].astype(np.float64) / arrays["scale_"].astype(np.float64)
    b = arrays["intercept_"].astype(np.float64) - W @ arrays["mean_"].astype(np.float64)
    if W.shape != tuple(layer.weight.shape):
        raise ValueError(f"the probe's weights {W.shape} do not fit the classifier {tuple(layer.weight.shape)}")
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(W))
        layer.bias.copy_(torch.as_tensor(b))


# --------------------------------------------------------------------------- data


class _TrainImages(Dataset):
    """Decoded, augmented uint8 crops; each sample's randomness is seeded by (seed, epoch, index)."""

    def __init__(self, root: Path, items, pre: Preprocess, augment: str, seed: int) -> None:
        self.root, self.items, self.pre, self.augment, self.seed = root, items, pre, augment, seed
        self.epoch = 0
        self.crop = RandomResizedCrop(pre.crop, scale=(0.25, 1.0), interpolation=InterpolationMode(pre.interpolation))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        img = load_rgb(self.root / rel)
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


# --------------------------------------------------------------------------- checkpoints


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# --------------------------------------------------------------------------- the stage


#: torch's RNG is global to a process, so fine-tunes in threads of one process (a sweep) take turns;
#: separate processes and machines run in parallel. A run's determinism is worth more than that overlap.
_ONE_AT_A_TIME = threading.Lock()


def finetune(plan: FinetunePlan) -> FinetuneResult:
    """Fine-tune (or resume, or reuse) the run for ``plan.key``; one writer per key (a lock that dies with it)."""
    started = time.perf_counter()
    folder = run_dir(plan)
    if not is_stored(plan):
        folder.mkdir(parents=True, exist_ok=True)
        with _ONE_AT_A_TIME, FileLock(str(folder / ".lock")):
            if not is_stored(plan):  # the run we waited for may have finished it
                return _train(plan, folder, started)
    saved = json.loads((folder / "result.json").read_text())
    return FinetuneResult.model_validate({**saved, "cache_hit": True, "seconds": 0.0, "epochs_run": 0})


def _train(plan: FinetunePlan, folder: Path, started: float) -> FinetuneResult:
    cfg = plan.finetune
    manifest = Manifest.load(plan.manifest)
    if "val" not in manifest.splits:
        raise ValueError("fine-tuning needs a val split for model selection and early stopping; set data.val_fraction > 0")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = load_model(plan.backbone, num_classes=len(manifest.classes))
    head = final_linear(model)
    if cfg.init_head == "best_probe":
        if plan.probe_key is None:
            raise ValueError(
                "finetune.init_head is best_probe but no linear probe was trained: add a logistic or linear head "
                "(penultimate layer, shots including all, preprocess none or standardize), or set init_head: random"
            )
        init_head_from_probe(model, head, plan.cache_dir, plan.probe_key)
    trainable_names = unfrozen_modules(model, cfg, head)
    params, frozen_bn = freeze(model, trainable_names)
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    pre = plan.backbone.preprocess
    train_set = _TrainImages(manifest.root, manifest.splits["train"], pre, cfg.augment, cfg.seed)
    val_set = _TrainImages(manifest.root, manifest.splits["val"], pre, "none", cfg.seed)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    opt = build_optimizer(model, head, cfg)
    sched = build_schedule(opt, cfg, steps)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda and cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []}
    last = folder / "last.pt"
    resumed_from = 0
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        state = json.loads(ckpt["state"])
        resumed_from = state["epoch"]
        log.info("resuming fine-tuning %s after epoch %d", plan.key[:12], resumed_from)
    workers = num_workers_for(cfg.num_workers, steps)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    metric = cfg.early_stopping.metric if cfg.early_stopping else "val_accuracy"
    stopped = False
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        train_set.epoch = epoch
        loader = _loader(train_set, cfg.batch_size, hash((cfg.seed, epoch)) & 0x7FFFFFFF, workers, cuda)
        set_train_mode(model, frozen_bn, cfg.freeze_bn)
        t0, seen, total_loss = time.perf_counter(), 0, 0.0
        bar = tqdm(loader, desc=f"finetune epoch {epoch}/{cfg.epochs}", unit="batch", disable=None, leave=False)
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = nn.functional.cross_entropy(model(pre.normalize(x)), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            batch_loss = loss.item()
            total_loss += batch_loss * len(y)
            bar.set_postfix(loss=f"{batch_loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            fault_point("finetune.batch")
        epoch_seconds = time.perf_counter() - t0
        rate = seen / epoch_seconds
        val_loss, val_acc = evaluate(model, val_set, cfg.batch_size, device, workers, autocast)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        entry = EpochLog(epoch=epoch, train_loss=total_loss / seen, val_loss=val_loss, val_accuracy=val_acc,
                         images_per_s=rate, seconds=epoch_seconds, lr_backbone=lrs.get("backbone", 0.0),
                         lr_head=lrs["head"])
        state["history"].append(entry.model_dump())
        log.info("epoch %d: loss %.4f, val acc %.4f, val loss %.4f, %.0f img/s", epoch, entry.train_loss, val_acc, val_loss, rate)
        score = val_acc if metric == "val_accuracy" else -val_loss
        if state["best"] is None or score > state["best"]:
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
            _save_atomic({"format": CHECKPOINT_FORMAT, "model": {k: v.cpu() for k, v in model.state_dict().items()},
                          "backbone": plan.backbone.name, "classes": canonical_json(manifest.classes),
                          "epoch": epoch, "val_accuracy": val_acc}, folder / "best.pt")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        stopped = bool(cfg.early_stopping and state["bad_epochs"] >= cfg.early_stopping.patience)
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                      "scaler": scaler.state_dict(), "rng": _rng_state(device), "state": json.dumps(state)}, last)
        fault_point("finetune.epoch")
        if stopped:
            log.info("early stopping after epoch %d (no %s improvement for %d epochs)", epoch, metric, state["bad_epochs"])
            break
    history = [EpochLog(**h) for h in state["history"]]
    best_acc = next(h.val_accuracy for h in history if h.epoch == state["best_epoch"])
    result = FinetuneResult(
        key=plan.key, best_checkpoint=folder / "best.pt", best_epoch=state["best_epoch"], best_val_accuracy=best_acc,
        epochs_run=len(history) - resumed_from, resumed_from=resumed_from, history=history,
        train_seconds=sum(h.seconds for h in history),
        trainable_params=sum(p.numel() for p in params),
        frozen_params=sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params),
        cache_hit=False, seconds=time.perf_counter() - started,
    )
    (folder / "result.json").write_text(result.model_dump_json(exclude={"cache_hit", "seconds"}))
    return result


def evaluate(model, dataset, batch_size, device, workers, autocast) -> tuple[float, float]:
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
