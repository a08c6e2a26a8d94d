"""The ``heads`` flow: every configured head on the cached features, one task each, concurrently."""
from __future__ import annotations

import os

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import ExperimentConfig, as_config
from flows.extract import extract_flow
from flows.stages import STAGE_TASK_OPTIONS, experiment_run_name, submit_stage
from tasks.extract import ExtractResult
from tasks.head_stage import HeadPlan, HeadResult, is_stored, plan_heads, train_head


@task(name="train-head", **STAGE_TASK_OPTIONS)
def train_head_task(plan: HeadPlan) -> HeadResult:
    return train_head(plan)


@flow(
    name="heads", flow_run_name=experiment_run_name("heads"), validate_parameters=False,
    task_runner=ThreadPoolTaskRunner(max_workers=max(1, min(4, os.cpu_count() or 1))),
)
def heads_flow(config: ExperimentConfig, features: dict[str, ExtractResult] | None = None) -> list[HeadResult]:
    """Train every head of the config; extracts (or reuses) the features first when not given them."""
    config = as_config(config)
    if not config.heads:
        raise ValueError(f"experiment {config.name!r} has no heads: add a heads: list to its config")
    features = features or extract_flow(config)
    val, test = features.get("val"), features.get("test")
    plans = plan_heads(config.heads, features["train"].key, val.key if val else None, config.cache_dir,
                       target_key=test.key if test else None)
    futures = [
        submit_stage(
            train_head_task, plan, stored=is_stored(plan), name=f"head-{plan.head.label}-{plan.head.layer}",
            retries=config.retries, retry_delay_s=config.retry_delay_s,
        )
        for plan in plans
    ]
    return [future.result() for future in futures]
