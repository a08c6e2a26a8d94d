"""The ``finetune`` flow: partial fine-tuning as one cached, retryable task that resumes on retry."""
from __future__ import annotations

from prefect import flow, task

from flows.config import ExperimentConfig, as_config
from flows.extract import extract_flow
from flows.heads import heads_flow
from flows.stages import STAGE_TASK_OPTIONS, experiment_run_name, run_stage
from tasks.extract import ExtractResult
from tasks.finetune import FinetunePlan, FinetuneResult, finetune, is_stored, plan_finetune
from tasks.head_stage import HeadResult, best_probe


@task(name="finetune", **STAGE_TASK_OPTIONS)
def finetune_task(plan: FinetunePlan) -> FinetuneResult:
    return finetune(plan)


@flow(name="finetune", flow_run_name=experiment_run_name("finetune"), validate_parameters=False)
def finetune_flow(
    config: ExperimentConfig,
    features: dict[str, ExtractResult] | None = None,
    heads: list[HeadResult] | None = None,
) -> FinetuneResult:
    """Fine-tune the backbone's unfrozen blocks; LP-FT starts from the best probe of the heads stage."""
    from tasks.backbones import resolve

    config = as_config(config)
    features = features or extract_flow(config)
    probe = None
    if config.finetune.init_head == "best_probe":
        heads = heads if heads is not None else (heads_flow(config, features) if config.heads else [])
        probe = best_probe(heads, config.cache_dir)
    train = features["train"]
    plan = plan_finetune(
        config.finetune, resolve(config.backbone), train.manifest, config.cache_dir,
        {split: r.key for split, r in features.items()}, probe,
    )
    return run_stage(finetune_task, plan, stored=is_stored(plan), name=f"finetune-{config.backbone.name}",
                     retries=config.retries, retry_delay_s=config.retry_delay_s)

