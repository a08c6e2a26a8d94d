"""The evaluation plan: the ``evaluate:`` config, the models to evaluate (heads and fine-tuned runs), the
plan's key, and the report's rows (:class:`ModelReport`). The stage and the report import it, never back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import ReportFiles
from tasks.backbones.config import BackboneSpec
from tasks.evaluate.projection import MapConfig
from tasks.index.retrieval import RetrievalConfig
from tasks.result import StageResult


class EvaluateConfig(BaseModel):
    """``evaluate:`` section: what the report computes besides the models' scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: RetrievalConfig | None = Field(None, description="Recall@k, precision@k and mAP@R of test queries")
    embedding_map: MapConfig = MapConfig()


class ModelToEvaluate(BaseModel):
    """A trained head (by artifact key) or the fine-tuned checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    layer: str = "penultimate"
    shot: int | str = "all"
    seed: int = 0
    head_key: str | None = None
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    tried: list[str] = Field(default_factory=list, description="the fine-tuning search's run keys (in the key: the "
                                                               "report lists them)")


class EvalPlan(BaseModel):
    """Every model to score on the test split, and what the experiment's report says besides the scores."""

    model_config = ConfigDict(frozen=True)

    key: str
    spec: dict[str, Any]
    experiment: str
    test_key: str
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    classes: list[str]
    models: list[ModelToEvaluate]
    device: str = "auto"
    retrieval: dict[str, Any] | None = Field(None, description="settings, queries' and gallery's feature keys, "
                                                                 "the FAISS index's settings (or None)")
    embedding_map: dict[str, Any] | None = Field(None, description="settings and the feature key of each split")
    quality: str | None = Field(None, description="the quality findings' key: their leaked test images are left out "
                                                  "of top1_without_leaks")
    context: dict[str, Any] = Field(default_factory=dict, description="report context (config, stage timings, keys); "
                                                                      "not in the key")

    @property
    def files(self) -> ReportFiles:
        return ReportFiles(CacheLayout(self.cache_dir).report(self.experiment, self.key))


class ModelReport(BaseModel):
    name: str
    kind: str
    layer: str
    shot: int | str
    seeds: int
    metrics: dict[str, Any]
    train_seconds: float = 0.0  # summed over seeds
    val_accuracy: float | None = None  # on the validation split, mean over seeds: what a recommendation may use
    artifacts: list[str] = Field(default_factory=list, description="head keys of its fits (best on val first), or "
                                                                   "the fine-tuning run's key")


class EvalResult(StageResult):
    key: str
    models: list[ModelReport]  # best first (test top-1)
    report: Path
    retrieval: dict[str, Any] | None = None


def plan_evaluation(experiment: str, test_key: str, manifest: Path, cache_dir: Path, backbone: BackboneSpec,
                    classes: list[str], models: list[ModelToEvaluate], device: str = "auto",
                    context: dict[str, Any] | None = None, retrieval: dict[str, Any] | None = None,
                    embedding_map: dict[str, Any] | None = None, quality: str | None = None) -> EvalPlan:
    """``quality``: the key of the experiment's quality findings: its leaked test images are left out of a second
    top-1 (``top1_without_leaks``)."""
    extras = {name: value for name, value in (("retrieval", retrieval), ("embedding_map", embedding_map),
                                              ("quality", quality)) if value}
    spec = keys.evaluation_spec(experiment, test_key, [
        m.model_dump(mode="json", exclude={"checkpoint", "train_seconds"}) | {"ckpt": _ckpt_id(m)} for m in models],
        extras)
    return EvalPlan(key=keys.key(spec), spec=spec, experiment=experiment, test_key=test_key, manifest=manifest,
                    cache_dir=cache_dir, backbone=backbone, classes=classes, models=models, device=device,
                    context=context or {}, retrieval=retrieval, embedding_map=embedding_map, quality=quality)


def _ckpt_id(m: ModelToEvaluate) -> str | None:
    return m.checkpoint.parent.name if m.checkpoint else None  # finetune/<key>/best.pt: the key says it all


def is_stored(plan: EvalPlan) -> bool:
    return plan.files.read_result() is not None
