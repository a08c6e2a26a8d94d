"""The selection plan: the ``select:`` config (candidate backbones), one :class:`ScorePlan` per candidate
(keyed by its training features, the layer and the weights) and the scores' result; the stage imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage import keys
from storage.layout import CacheLayout
from storage.records import Records
from tasks.backbones.config import BackboneConfig, BackboneSpec, resolve
from tasks.declare import Graph, Section, Stage, Work, against, features
from tasks.result import StagePlan, StageResult


class Candidate(BaseModel):
    """One backbone to score: a label and a backbone section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str
    backbone: BackboneConfig


class SelectConfig(BaseModel):
    """``select:`` section: candidate backbones ranked on this experiment's data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: list[Candidate] = Field(min_length=2)
    layer: str = "penultimate"

    @field_validator("candidates")
    @classmethod
    def _unique(cls, v: list[Candidate]) -> list[Candidate]:
        labels = [c.label for c in v]
        if len(set(labels)) != len(labels):
            raise ValueError(f"candidate labels must be unique, got {labels}")
        return v


def is_stored(plan: ScorePlan) -> bool:
    return _scores(plan.cache_dir).read(plan.key) is not None


class ScorePlan(StagePlan):
    label: str
    train_key: str
    layer: str
    cache_dir: Path
    backbone: BackboneSpec


class Score(BaseModel):
    value: float | None
    seconds: float
    skipped: str | None = None


class ScoreResult(StageResult):
    key: str
    label: str
    scores: dict[str, Score]


def plan_scores(label: str, train_key: str, layer: str, cache_dir: Path, backbone: BackboneSpec) -> ScorePlan:
    spec = keys.scores_spec(train_key, layer, backbone.weights_id)
    return ScorePlan(key=keys.key(spec), spec=spec, label=label, train_key=train_key, layer=layer, cache_dir=cache_dir, backbone=backbone)


def _scores(cache_dir: Path) -> Records:
    return Records(CacheLayout(cache_dir).scores)


def _plan(config: Any, graph: Graph) -> list[Work]:
    if config.select is None:
        raise ValueError(f"experiment {config.name!r} has no select: section listing candidate backbones")
    plan = plan_scores(config.name, features(graph)["train"].key, config.select.layer, config.cache_dir,
                       resolve(config.backbone, config.cache_dir))
    return [Work(config.name, plan, is_stored(plan))]


STAGE = Stage("score", _plan, "tasks.select.stage:score_candidate", "score-candidate", lambda c, w: f"score-{w.what}",
              after=("extract", "heads"), why=against("scores"), stored=is_stored,
              section=Section("select", SelectConfig | None, Field(
                  None, description="candidate backbones for transferpipe select")),
              imports=frozenset({"backbones", "heads"}))
