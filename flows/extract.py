"""The ``extract`` flow: one cached, retryable task per split."""
from __future__ import annotations

from prefect import flow, task

from flows.config import ExperimentConfig, as_config
from flows.stages import STAGE_TASK_OPTIONS, experiment_run_name, run_stage
from tasks.extract import ExtractResult, SplitPlan, extract_split, is_stored, plan_extraction


@task(name="extract-split", **STAGE_TASK_OPTIONS)
def extract_split_task(plan: SplitPlan) -> ExtractResult:
    return extract_split(plan)


@flow(name="extract", flow_run_name=experiment_run_name("extract"), validate_parameters=False)
def extract_flow(config: ExperimentConfig) -> dict[str, ExtractResult]:
    """Frozen-backbone features of every split, cached in HDF5 by content key."""
    config = as_config(config)
    plans = plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    if config.dask is not None and not all(is_stored(plan) for plan in plans):
        from flows.scale_out import sharded_extract

        return sharded_extract(config, plans)
    return {
        plan.split: run_stage(
            extract_split_task, plan, stored=is_stored(plan),
            name=f"extract-{config.backbone.name}-{plan.split}",
            retries=config.retries, retry_delay_s=config.retry_delay_s,
        )
        for plan in plans
    }
