"""The heads plan: one :class:`HeadPlan` per entry of ``heads:`` (and its ``-cleaned`` twin with
``quality.exclude``), each (shot, seed) fit's key, and the results; the stage imports it, never the other way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from storage import head_store, keys
from storage.head_store import head_exists
from tasks.declare import Graph, Section, Stage, Unit, Work, against, features
from tasks.heads.configs import HeadConfig, Shot
from tasks.result import StageResult

#: the name suffix of a head trained without the quality stage's label-issue candidates (quality.exclude)
CLEANED = "-cleaned"


class HeadPlan(BaseModel):
    """One head config on one set of features; small enough to cross a task boundary."""

    model_config = ConfigDict(frozen=True)

    key: str
    head: HeadConfig
    train_key: str
    val_key: str | None
    target_key: str | None = None
    cache_dir: Path
    #: the quality findings' key whose label-issue candidates this head's training leaves out (quality.exclude)
    exclude: str | None = None

    @property
    def label(self) -> str:
        """The head's name, with :data:`CLEANED` when it trains without the flagged rows."""
        return self.head.label + (CLEANED if self.exclude else "")


class FitRecord(BaseModel):
    """One trained (shot, seed); ``seconds`` is what its fit took, also when it is reused."""

    shot: Shot
    seed: int
    key: str
    n_train: int
    val_accuracy: float
    best_param: Any
    grid: list[dict[str, Any]]
    fitted: bool
    seconds: float


class HeadResult(StageResult):
    """Every (shot, seed) of one head config, and the mean val accuracy per shot count."""

    work_fields: tuple[str, ...] = ("fits",)
    key: str
    name: str
    kind: str
    layer: str
    records: list[FitRecord]
    fits: int

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for shot in dict.fromkeys(r.shot for r in self.records):
            accs = [r.val_accuracy for r in self.records if r.shot == shot]
            out[str(shot)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "n": len(accs)}
        return out


def plan_heads(
    heads: list[Any], train_key: str, val_key: str | None, cache_dir: Path, target_key: str | None = None,
    exclude: str | None = None,
) -> list[HeadPlan]:
    """One plan per head; with ``exclude`` (a quality key) also each head trained without that quality run's
    training label-issue candidates (named ``<name>-cleaned``, a key of its own)."""
    names = [h.label for h in heads]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"heads: names must be unique, {dupes} repeat; set name: on each")
    aligned = [h.label for h in heads if h.needs_target()]
    if aligned and target_key is None:
        raise ValueError(f"heads {aligned} use align: coral or centre: target, which needs a test split as the "
                         "target domain")
    plans = []
    for h in heads:
        target = target_key if h.needs_target() else None
        for without in (None, exclude) if exclude else (None,):
            key = keys.key(keys.head_spec(h.model_dump(), train_key, val_key, target, exclude=without))
            plans.append(HeadPlan(key=key, head=h, train_key=train_key, val_key=val_key, target_key=target,
                                  cache_dir=Path(cache_dir), exclude=without))
    return plans


def plan_for_splits(heads: list[Any], feature_keys: dict[str, str], cache_dir: Path,
                    exclude: str | None = None) -> list[HeadPlan]:
    """:func:`plan_heads` on an experiment's splits: train, val if any, test (the CORAL target) if any."""
    return plan_heads(heads, feature_keys["train"], feature_keys.get("val"), cache_dir,
                      target_key=feature_keys.get("test"), exclude=exclude)


def fit_spec(plan: HeadPlan, shot: Shot, seed: int) -> dict[str, Any]:
    head = plan.head.model_dump(exclude={"name", "shots", "seeds"})
    return keys.fit_spec(head, plan.train_key, plan.val_key, plan.target_key, shot, seed, exclude=plan.exclude)


def fit_key(plan: HeadPlan, shot: Shot, seed: int) -> str:
    return keys.key(fit_spec(plan, shot, seed))


def fits(plan: HeadPlan) -> list[tuple[Shot, int, str]]:
    """Every (shot, seed) of the head and its fit's key."""
    h = plan.head
    pairs = [(shot, h.seed + i) for shot in h.shots for i in range(1 if shot == "all" else h.seeds)]
    return [(shot, seed, fit_key(plan, shot, seed)) for shot, seed in pairs]


def is_stored(plan: HeadPlan) -> bool:
    return all(head_exists(plan.cache_dir, key) for _, _, key in fits(plan))


def probe_candidates(plans: list[HeadPlan]) -> list[str]:
    """Fit keys of the heads LP-FT may start from: linear probes on the penultimate layer, all labels, raw or
    standardised features. Known before any head is trained, so the fine-tune key is too (``transferpipe plan``)."""
    return [key for p in plans if p.head.linear_probe and p.head.layer == "penultimate" and p.exclude is None
            and p.head.preprocess in ("none", "standardize") for shot, _, key in fits(p) if shot == "all"]


def _plan(config: Any, graph: Graph) -> list[Work]:
    if not config.heads:
        raise ValueError(f"experiment {config.name!r} has no heads: add a heads: list to its config")
    feature_keys = {split: f.key for split, f in features(graph).items()}
    wanted = config.quality is not None and config.quality.exclude and "quality" in graph
    cleaned = graph["quality"].works[0].plan.key if wanted else None
    return [Work(p.label, p, is_stored(p)) for p in plan_for_splits(config.heads, feature_keys, config.cache_dir,
                                                                     exclude=cleaned)]


def _units(work: Work) -> list[Unit]:
    plan = work.plan
    return [Unit(f"{plan.label} shot {shot} seed {seed}", key, head_exists(plan.cache_dir, key),
                 fit_spec(plan, shot, seed)) for shot, seed, key in fits(plan)]


def _damage(work: Work, unit: Unit) -> list[str]:
    problem = head_store.head_problem(work.plan.cache_dir, unit.key)
    return [f"head {problem}: will train again"] if problem and problem != "missing" else []


STAGE = Stage("heads", _plan, "tasks.heads.stage:train_head", "train-head",
              lambda c, w: f"head-{w.plan.label}-{w.plan.head.layer}",
              after=("extract", "quality"), when=lambda c, path: bool(c.heads), units=_units,
              why=against("heads", _damage), concurrent=True, stored=is_stored,
              section=Section("heads", list[HeadConfig], Field(
                  default_factory=list, description="heads trained on the cached features")))
