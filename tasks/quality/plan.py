"""The quality plan: the ``quality:`` config, its key (every split's feature key and these settings) and result.

The stage and the finders import it, never the other way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import QualityFiles
from tasks.declare import Graph, Section, Stage, Work, against, check_layer, features
from tasks.result import StagePlan, StageResult

#: the near-duplicate threshold (centred cosine of penultimate features) when the config names none: measured
#: on MNIST-5k with planted copies (benchmarks/quality.py): copies and re-encoded copies sit above it, every
#: clean test image's nearest distinct training image below (docs/evaluation.md#data-quality)
DUPLICATE_COSINE = 0.98


class QualityConfig(BaseModel):
    """``quality:`` what to look for in the data, from the cached features (no backbone pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = "penultimate"
    duplicate_cosine: float = Field(DUPLICATE_COSINE, gt=0, le=1,
                                    description="pairs at or above this cosine are near-duplicates (leaks across splits)")
    neighbours: int = Field(10, ge=2, le=100, description="neighbours searched per image (duplicates, outliers, votes)")
    folds: int = Field(5, ge=2, le=20, description="folds of the out-of-fold probe on the training split")
    top: int = Field(20, ge=1, le=1000, description="findings listed (and drawn) per kind and split")
    seed: int = 0
    search: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="exact: every row against every row; approximate: principal components and a FAISS "
                            "index, near-duplicates re-scored exactly; auto: approximate above 50,000 rows a split")
    dims: int = Field(128, ge=8, le=1024, description="principal components of the approximate search")
    pixels: bool = Field(False, description="also compare images by a 64-bit hash of their pixels (one decode "
                                            "pass): finds faintly re-encoded copies features miss")
    exclude: bool = Field(False, description="also train every head without the training label-issue candidates "
                                             "(<name>-cleaned); the report gives the gain with its paired interval")


#: settings that change what is done with the findings, not the findings (left out of the quality key)
NOT_IN_KEY = {"exclude"}


class QualityPlan(StagePlan):
    experiment: str
    features: dict[str, str]  # split -> feature key
    manifest: Path
    config: QualityConfig
    cache_dir: Path

    @property
    def files(self) -> QualityFiles:
        return QualityFiles(CacheLayout(self.cache_dir).quality(self.key))


class QualityResult(StageResult):
    key: str
    folder: Path
    #: near-duplicate pairs by split pair ("train", "train-test", ...); exact: identical image bytes
    duplicates: dict[str, int]
    exact_duplicates: int
    #: label-issue candidates: Confident Learning on train, kNN vote disagreement on val and test
    label_issues: dict[str, int]
    outliers: dict[str, int]
    pixel_duplicates: dict[str, int] = {}  # pairs by pixel hash (quality.pixels), by split pair
    leaked_test: int  # test images with a near-duplicate in train or val

    @property
    def report(self) -> Path:
        return QualityFiles(self.folder).report


def plan_quality(config: QualityConfig, features: dict[str, str], manifest: Path, cache_dir: Path,
                 experiment: str) -> QualityPlan:
    spec = keys.quality_spec(features, config.model_dump(mode="json", exclude=NOT_IN_KEY))
    return QualityPlan(key=keys.key(spec), spec=spec, experiment=experiment, features=features,
                       manifest=Path(manifest), config=config, cache_dir=Path(cache_dir))


def is_stored(plan: QualityPlan) -> bool:
    return plan.files.done()


def _plan(config: Any, graph: Graph) -> list[Work]:
    split, wanted = features(graph), config.quality or QualityConfig()
    if "train" not in split:
        raise ValueError("quality: needs a train split")
    check_layer(config, "quality.layer", wanted.layer)
    plan = plan_quality(wanted, {s: f.key for s, f in split.items()}, split["train"].manifest, config.cache_dir,
                        config.name)
    return [Work(config.name, plan, is_stored(plan))]


def _runs(config: Any, path: frozenset[str]) -> bool:
    """With a ``quality:`` section, in a run through the evaluation (its report leaves leaked test images out, so
    ``run``, ``predict`` and ``export-model`` see the same evaluation); before the heads only with
    ``quality.exclude`` (it names the rows the cleaned heads leave out)."""
    return config.quality is not None and ("evaluate" in path or config.quality.exclude)


STAGE = Stage("quality", _plan, "tasks.quality.stage:assess", "quality", lambda c, w: f"quality-{c.name}",
              after=("extract",), when=_runs, why=against("quality"), stored=is_stored,
              section=Section("quality", QualityConfig | None, Field(
                  None, description="near-duplicates, leaks, label issues and outliers (transferpipe quality; a run "
                                    "too when set)")),
              imports=frozenset({"data", "index"}))
