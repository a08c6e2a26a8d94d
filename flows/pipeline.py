"""The pipeline flow: the experiment graph (flows/planning/graph.py: extract → heads → finetune if enabled → evaluate) run
as one Prefect flow, its results as one small model: every stage's results by name (``outputs``), and the
classic stages' also as fields."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.planning import graph, nodes
from tasks.declare import features
from flows.execution.publish import publish_quality, publish_report
from storage.records import PredictionFiles
from flows.config import ExperimentConfig, as_config
from flows.execution.local import experiment_run_name
from tasks.evaluate.plan import EvalResult, ModelReport
from tasks.export.plan import ExportResult
from tasks.extract.plan import ExtractResult
from tasks.index.plan import IndexResult
from tasks.quality.plan import QualityResult
from tasks.finetune.plan import FinetuneResult
from tasks.heads.plan import HeadResult
from tasks.result import summarize

Stop = nodes.Goal


class PipelineResult(BaseModel):
    experiment: str
    features: dict[str, ExtractResult]
    heads: list[HeadResult] = []
    finetune: FinetuneResult | None = None
    evaluation: EvalResult | None = None
    exports: list[ExportResult] = []
    index: IndexResult | None = None
    quality: QualityResult | None = None
    stages: dict[str, dict[str, float | bool]]
    outputs: dict[str, list[Any]] = {}  #: every stage that ran, its results by stage name

    @property
    def models(self) -> list[ModelReport]:
        """Every evaluated model, best first (test top-1)."""
        return self.evaluation.models if self.evaluation else []

    @property
    def report(self) -> Path | None:
        return self.evaluation.report if self.evaluation else None

    @property
    def finetune_checkpoint(self) -> Path | None:
        return self.finetune.best_checkpoint if self.finetune else None


@flow(name="pipeline", flow_run_name=experiment_run_name("run"), validate_parameters=False,
      task_runner=ThreadPoolTaskRunner(max_workers=max(1, min(4, os.cpu_count() or 1))))
def pipeline_flow(config: ExperimentConfig, stop_after: Stop = "evaluate") -> PipelineResult:
    """Images to a ranked comparison of every head and the fine-tuned model on the test split.

    ``stop_after`` ends the run after that stage (the extract, heads and finetune
    commands); the stage named there runs even when the config leaves it out.
    """
    config = as_config(config)
    ran = graph.run(config, stop_after)
    results = {stage: done.results for stage, done in ran.items()}
    evaluation = results["evaluate"][0] if "evaluate" in results else None
    if evaluation is not None:  # with the trust report of each prediction this run made
        publish_report(config.name, evaluation, [PredictionFiles(r.path.parent).report for r in results.get("predict", [])])
    if results.get("quality"):
        publish_quality(config.name, results["quality"][0])
    first = {name: (results.get(name) or [None])[0] for name in ("index", "quality")}
    return PipelineResult(experiment=config.name, features=features(ran), heads=results.get("heads", []),
                          finetune=_chosen(results.get("finetune")), evaluation=evaluation,
                          exports=results.get("export", []), **first, outputs=results,
                          stages={stage: summarize(r) for stage, r in results.items()})


def _chosen(tuned: list[FinetuneResult] | None) -> FinetuneResult | None:
    """The fine-tuned model: the one run, or the search's run best on validation."""
    from tasks.finetune.plan import pick

    return tuned[pick(tuned)] if tuned else None
