"""The ``select`` flow: rank candidate backbones from cached features before training any of them."""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows import stages
from flows.artifacts import publish_table
from flows.config import ExperimentConfig, as_config
from flows.runtime import experiment_run_name
from flows.stage_tasks import run_stage, score_task
from storage.layout import CacheLayout
from tasks import select
from tasks.backbones import resolve
from tasks.heads import KNNConfig, LogisticConfig


class SelectResult(BaseModel):
    rows: list[dict]
    kendall_tau: dict[str, float | None]
    report: str


@flow(name="select", flow_run_name=experiment_run_name("select"), validate_parameters=False)
def select_flow(config: ExperimentConfig) -> SelectResult:
    """Every candidate: features (cached), cheap scores, and the kNN and logistic probes' val accuracy."""
    config = as_config(config)
    if config.select is None:
        raise ValueError(f"experiment {config.name!r} has no select: section listing candidate backbones")
    layer = config.select.layer
    probes = [LogisticConfig(kind="logistic", layer=layer), KNNConfig(kind="knn", layer=layer)]
    rows = []
    for cand in config.select.candidates:
        cfg = config.model_copy(update={"name": f"{config.name}-{cand.label}", "backbone": cand.backbone, "heads": probes})
        features = stages.extract_features(cfg)
        probed = {h.kind: h for h in stages.train_heads(cfg, features)}
        plan = select.plan_scores(cand.label, features["train"].key, layer, config.cache_dir,
                                   resolve(cand.backbone, config.cache_dir))
        scored = run_stage(score_task, plan, config, stored=select.is_stored(plan), name=f"score-{cand.label}")
        rows.append(select.candidate_row(cand.label, cand.backbone, scored, probed))
    rows, taus = select.rank_candidates(rows)
    report = select.write_selection(CacheLayout(config.cache_dir).selection(config.name), config.name, rows, taus)
    publish_table(f"{config.name}-select", rows, f"{config.name}: candidate backbones")
    return SelectResult(rows=rows, kendall_tau=taus, report=str(report))
