"""The stages of an experiment as the Prefect tasks they run: plain functions that a flow calls in order.

Each takes the config and, explicitly, the results of the stages it needs; none
calls another, so only the flow decides the order.
"""
from __future__ import annotations

import logging

from flows import explain
from flows.config import ExperimentConfig
from flows.stage_tasks import (
    evaluate_task, extract_split_task, finetune_task, run_stage, submit_stage, train_head_task,
)
from storage import artifacts
from tasks import evaluate as evaluation
from tasks import extract, finetune, heads
from tasks.backbones import resolve
from tasks.data import Manifest
from tasks.evaluate import EvalResult, ModelToEvaluate
from tasks.extract import ExtractResult
from tasks.finetune import FinetuneResult
from tasks.heads import HeadResult

log = logging.getLogger("transferpipe.plan")


def _computing(what: str, why: list[str]) -> None:
    """The run's log says why a stage computes: the same explanation as ``transferpipe plan``."""
    log.info("%s: computing because %s", what, "; ".join(why))


def extract_features(config: ExperimentConfig) -> dict[str, ExtractResult]:
    """Features of every split: one task per split, or shards on Dask workers (``dask:``) for splits not cached."""
    plans = extract.plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    stored = {split: extract.is_stored(plan) for split, plan in plans.items()}
    for split in (s for s, hit in stored.items() if not hit):
        _computing(f"extract {split}", explain.why_features(config.cache_dir, plans[split]))
    if config.dask is not None and not all(stored.values()):
        from flows.scale_out import sharded_extract

        return sharded_extract(config, list(plans.values()))
    return {
        split: run_stage(extract_split_task, plan, config, stored=stored[split],
                         name=f"extract-{config.backbone.name}-{split}")
        for split, plan in plans.items()
    }


def require_test_split(features: dict[str, ExtractResult]) -> None:
    if "test" not in features:
        raise ValueError("the pipeline evaluates on a test split: set data.test_fraction > 0 or add a test folder")


def train_heads(config: ExperimentConfig, features: dict[str, ExtractResult]) -> list[HeadResult]:
    """Every head of the config on the cached features, one task each, concurrently."""
    if not config.heads:
        raise ValueError(f"experiment {config.name!r} has no heads: add a heads: list to its config")
    plans = heads.plan_for_splits(config.heads, {s: r.key for s, r in features.items()}, config.cache_dir)
    stored = {plan.key: heads.is_stored(plan) for plan in plans}
    if not all(stored.values()):
        specs = artifacts.stored_specs(config.cache_dir)
        for plan in (p for p in plans if not stored[p.key]):
            shot, seed, _ = next(f for f in heads.fits(plan) if not artifacts.head_exists(config.cache_dir, f[2]))
            _computing(f"head {plan.head.label} (shot {shot}, seed {seed})",
                       explain.why_not_cached(heads.fit_spec(plan, shot, seed), specs))
    futures = [submit_stage(train_head_task, plan, config, stored=stored[plan.key],
                            name=f"head-{plan.head.label}-{plan.head.layer}") for plan in plans]
    return [future.result() for future in futures]


def finetune_backbone(
    config: ExperimentConfig, features: dict[str, ExtractResult], trained: list[HeadResult]
) -> FinetuneResult:
    """Fine-tune the unfrozen blocks; LP-FT starts from the best probe among ``trained``."""
    probe = heads.best_probe(trained, config.cache_dir) if config.finetune.init_head == "best_probe" else None
    plan = finetune.plan_finetune(config.finetune, resolve(config.backbone, config.cache_dir), features["train"].manifest,
                                  config.cache_dir, {split: r.key for split, r in features.items()}, probe)
    stored = finetune.is_stored(plan)
    if not stored:
        _computing("finetune", explain.why_not_cached(plan.spec, finetune.stored_specs(config.cache_dir)))
    return run_stage(finetune_task, plan, config, stored=stored, name=f"finetune-{config.backbone.name}")


def evaluate_models(
    config: ExperimentConfig, features: dict[str, ExtractResult], trained: list[HeadResult],
    tuned: FinetuneResult | None, stages: dict[str, dict[str, float | bool]],
) -> EvalResult:
    """Every head fit and the fine-tuned model on the test split; the report and registry rows with it."""
    models = [
        ModelToEvaluate(name=h.name, kind=h.kind, layer=h.layer, shot=r.shot, seed=r.seed, head_key=r.key,
                        train_seconds=r.seconds)
        for h in trained for r in h.records
    ]
    if tuned:
        models.append(ModelToEvaluate(name="finetuned", kind="finetune", checkpoint=tuned.best_checkpoint,
                                      train_seconds=tuned.train_seconds))
    if not models:
        raise ValueError(f"experiment {config.name!r} has nothing to evaluate: add heads or enable finetune")
    test = features["test"]
    context = {
        "config": config.model_dump(mode="json"), "stages": stages,
        "keys": {"features": {s: r.key for s, r in features.items()}, "heads": {m.name: m.head_key for m in models},
                 "finetune": tuned.key if tuned else None},
    }
    plan = evaluation.plan_evaluation(
        config.name, test.key, test.manifest, config.cache_dir, resolve(config.backbone, config.cache_dir),
        Manifest.load(test.manifest).classes, models, device=config.extract.device, context=context,
    )
    stored = evaluation.is_stored(plan)
    if not stored:
        _computing("evaluate", explain.why_not_cached(plan.spec, evaluation.stored_specs(config.cache_dir, config.name)))
    return run_stage(evaluate_task, plan, config, stored=stored, name=f"evaluate-{config.name}")
