"""The fine-tuning plan: the ``finetune:`` config (a grid over its searchable fields), one
:class:`FinetunePlan` per grid point, its key, and which run a search keeps. The stage and the loop import
it, never the other way.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import keys
from storage.checkpoints import RunFiles
from storage.layout import CacheLayout
from tasks.backbones.config import BackboneSpec, resolve
from tasks.declare import Graph, Section, Stage, Work, against, features
from tasks.heads.plan import probe_candidates
from tasks.machine import forward_precision
from tasks.result import StagePlan, StageResult


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    patience: int = Field(3, ge=1)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"


#: the settings ``finetune.search`` may try
SEARCHABLE = ("lr_backbone", "lr_head", "last_n", "unfreeze", "epochs", "weight_decay", "freeze_bn", "warmup_epochs")


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
    search: dict[str, list[Any]] | None = Field(None, description=(
        "settings to try, each a list (e.g. lr_backbone: [1e-4, 1e-5], last_n: [1, 2]): one cached, resumable run "
        "per combination; the run best on validation is the fine-tuned model (each run's epoch 0 is the probe)"))

    @field_validator("search")
    @classmethod
    def _search(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if v is None:
            return v
        bad = sorted(set(v) - set(SEARCHABLE))
        if bad:
            raise ValueError(f"search: {bad} cannot be searched; searchable: {', '.join(SEARCHABLE)}")
        empty = [k for k, values in v.items() if not isinstance(values, list) or not values]
        if empty:
            raise ValueError(f"search: {empty} need a non-empty list of values each")
        return v

    def candidates(self) -> list[tuple[str, FinetuneConfig]]:
        """(label, config) of every run the search tries: each combination of its values set on this config
        (label "" and this config without a search). Each candidate is validated as a config of its own."""
        if not self.search:
            return [("", self)]
        names, base = list(self.search), self.model_dump(exclude={"search"})
        out = []
        for values in itertools.product(*(self.search[n] for n in names)):
            override = dict(zip(names, values))
            try:
                cfg = FinetuneConfig.model_validate({**base, **override})
            except ValueError as exc:
                raise ValueError(f"finetune.search candidate {override}: {exc}") from None
            out.append((" ".join(f"{n}={v}" for n, v in override.items()), cfg))
        return out

    @field_validator("unfreeze")
    @classmethod
    def _names(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("unfreeze needs module names, 'all', or use last_n")
        return v


class FinetunePlan(StagePlan):
    backbone: BackboneSpec
    manifest: Path
    cache_dir: Path
    finetune: FinetuneConfig
    probes: list[str] = Field(default_factory=list, description="LP-FT: fit keys of the linear probes it may start "
                                                                 "from; the stage starts from the best on val")


class EpochLog(BaseModel):
    epoch: int  # 0: the probe LP-FT starts from, validated before any training (no train loss)
    train_loss: float | None
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
                  feature_keys: dict[str, str], probes: list[str]) -> FinetunePlan:
    """Key: feature inputs (backbone + split fingerprints) + finetune config + the LP-FT probes to choose from.

    The probes are fit keys (:func:`tasks.heads.stage.probe_candidates`): which one is best on val follows from them,
    so the key is known before any head is trained.
    """
    probes = list(probes) if cfg.init_head == "best_probe" else []
    spec = keys.finetune_spec(backbone.key_fields(), feature_keys,
                              cfg.model_dump(exclude={"enabled", "device", "num_workers", "search"}), probes or None,
                              forward_precision(cfg.device, cfg.amp))
    return FinetunePlan(spec=spec, key=keys.key(spec), backbone=backbone, manifest=manifest, cache_dir=Path(cache_dir),
                        finetune=cfg, probes=probes)


def chosen(plans: list[FinetunePlan]) -> int:
    """Which candidate run is the fine-tuned model: the highest validation accuracy among those finished (the
    first on ties, and the first while none has finished)."""
    best, index = None, 0
    for i, plan in enumerate(plans):
        done = run_files(plan).read_result()
        if done is not None and (best is None or done["best_val_accuracy"] > best):
            best, index = done["best_val_accuracy"], i
    return index


def pick(results: list[FinetuneResult]) -> int:
    """:func:`chosen` on finished runs' results."""
    return max(range(len(results)), key=lambda i: (results[i].best_val_accuracy, -i))


def run_files(plan: FinetunePlan) -> RunFiles:
    return RunFiles(CacheLayout(plan.cache_dir).finetune_run(plan.key))


def is_stored(plan: FinetunePlan) -> bool:
    return run_files(plan).finished()


def _plan(config: Any, graph: Graph) -> list[Work]:
    split = features(graph)
    probes = probe_candidates(graph["heads"].plans()) if "heads" in graph else []
    spec, feature_keys = resolve(config.backbone, config.cache_dir), {s: f.key for s, f in split.items()}
    works = []
    for label, cfg in config.finetune.candidates():  # one run, or one per combination of finetune.search
        plan = plan_finetune(cfg, spec, split["train"].manifest, config.cache_dir, feature_keys, probes)
        works.append(Work(label or config.backbone.name, plan, is_stored(plan)))
    return works


STAGE = Stage("finetune", _plan, "tasks.finetune.stage:finetune", "finetune",
              lambda c, w: f"finetune-{c.backbone.name}" + ("" if w.what == c.backbone.name else f" {w.what}"),
              after=("extract", "quality", "heads"), when=lambda c, path: c.finetune.enabled,
              why=against("finetune", lambda w, u: run_files(w.plan).problems()), device=lambda p: p.finetune.device,
              stored=is_stored, section=Section("finetune", FinetuneConfig, FinetuneConfig()),
              imports=frozenset({"data", "backbones", "heads"}))
