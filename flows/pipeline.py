"""The whole pipeline as one flow: extract → heads → finetune (if enabled) → evaluate → report."""
from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows.config import ExperimentConfig, as_config
from flows.extract import extract_flow
from flows.finetune import finetune_flow
from flows.heads import heads_flow
from flows.stages import STAGE_TASK_OPTIONS, experiment_run_name, run_stage
from storage import results as registry
from tasks.backbones import resolve
from tasks.evaluate import EvalPlan, EvalResult, ModelReport, ModelToEvaluate, evaluate, plan_evaluation, summary_rows, write_report
from tasks.extract import versions


@task(name="evaluate", **STAGE_TASK_OPTIONS)
def evaluate_task(plan: EvalPlan) -> EvalResult:
    return evaluate(plan)


class PipelineResult(BaseModel):
    experiment: str
    report: Path
    models: list[ModelReport]
    stages: dict[str, dict[str, float | bool]]
    finetune_checkpoint: Path | None = None


def _stage(results) -> dict[str, float | bool]:
    """Time, cache status and work done (forward batches, fits, epochs) of one stage."""
    results = results if isinstance(results, list) else [results]
    work = {f: sum(getattr(r, f) for r in results) for f in results[0].work_fields}
    return {"seconds": sum(r.seconds for r in results), "cache_hit": all(r.cache_hit for r in results), **work}


@flow(name="pipeline", flow_run_name=experiment_run_name("run"), validate_parameters=False)
def pipeline_flow(config: ExperimentConfig) -> PipelineResult:
    """Images to a ranked comparison of every head and the fine-tuned model on the test split."""
    config = as_config(config)
    features = extract_flow(config)
    if "test" not in features:
        raise ValueError("the pipeline evaluates on a test split: set data.test_fraction > 0 or add a test folder")
    stages = {"extract": _stage(list(features.values()))}
    heads = heads_flow(config, features) if config.heads else []
    if heads:
        stages["heads"] = _stage(heads)
    tuned = finetune_flow(config, features, heads) if config.finetune.enabled else None
    if tuned:
        stages["finetune"] = _stage(tuned)
    models = [
        ModelToEvaluate(name=h.name, kind=h.kind, layer=h.layer, shot=r.shot, seed=r.seed, head_key=r.key,
                        train_seconds=r.seconds)
        for h in heads for r in h.records
    ]
    if tuned:
        models.append(ModelToEvaluate(name="finetuned", kind="finetune", checkpoint=tuned.best_checkpoint,
                                      train_seconds=tuned.train_seconds))
    if not models:
        raise ValueError(f"experiment {config.name!r} has nothing to evaluate: add heads or enable finetune")
    from tasks.data import Manifest

    manifest = Manifest.load(features["test"].manifest)
    plan = plan_evaluation(features["test"].key, features["test"].manifest, config.cache_dir, resolve(config.backbone),
                           manifest.classes, models, device=config.extract.device)
    result = run_stage(evaluate_task, plan, stored=True, name=f"evaluate-{config.name}",
                       retries=config.retries, retry_delay_s=config.retry_delay_s)
    stages["evaluate"] = _stage(result)
    folder = config.cache_dir / "runs" / config.name / plan.key[:12]
    context = {
        "experiment": config.name, "backbone": config.backbone.name, "weights": config.backbone.weights,
        "classes": manifest.classes, "config": config.model_dump(mode="json"), "stages": stages,
        "keys": {"features": {s: r.key for s, r in features.items()}, "heads": {m.name: m.head_key for m in models},
                 "finetune": tuned.key if tuned else None, "evaluation": plan.key},
        "versions": versions(),
    }
    paths = write_report(folder, result, context)
    ranked = sorted(result.models, key=lambda r: -r.metrics["top1"])
    _publish(config.name, paths["md"].read_text(), summary_rows(ranked))
    if not result.cache_hit:
        registry.append(config.cache_dir, _registry_rows(config, features, plan.key, ranked, paths["json"]))
    return PipelineResult(experiment=config.name, report=paths["md"], models=ranked, stages=stages,
                          finetune_checkpoint=tuned.best_checkpoint if tuned else None)


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment or sweep name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "experiment"


def _publish(name: str, markdown: str, rows: list[dict]) -> None:
    """The report as Prefect artifacts: visible on the flow run in the Prefect UI."""
    key = artifact_key(name)
    create_markdown_artifact(markdown=markdown, key=f"{key}-report", description=f"{name}: test results")
    create_table_artifact(table=rows, key=f"{key}-models", description=f"{name}: models ranked by top-1")


def _registry_rows(config, features, run_key, ranked, report) -> list[dict]:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [
        {"created_at": now, "experiment": config.name, "run_key": run_key, "model": r.name, "kind": r.kind,
         "layer": r.layer, "shots": str(r.shot), "seeds": r.seeds, "backbone": config.backbone.name,
         "weights": config.backbone.weights, "features_key": features["train"].key, "n_test": r.metrics["n"],
         "report": str(report), **{m: r.metrics.get(m) for m in registry.METRICS}}
        for r in ranked
    ]
