"""The ``select`` flow: rank candidate backbones from cached features before training any of them."""
from __future__ import annotations

from prefect import flow
from pydantic import BaseModel

from flows.planning import graph, nodes
from flows.execution.publish import publish_table
from flows.config import ExperimentConfig, as_config
from flows.execution.local import experiment_run_name
from tasks.select import stage as select


class SelectResult(BaseModel):
    rows: list[dict]
    kendall_tau: dict[str, float | None]
    report: str


@flow(name="select", flow_run_name=experiment_run_name("select"), validate_parameters=False)
def select_flow(config: ExperimentConfig) -> SelectResult:
    """Every candidate: features (cached), cheap scores, and the kNN and logistic probes' val accuracy."""
    config = as_config(config)
    rows = []
    for label, candidate in nodes.candidates(config):
        ran = graph.run(candidate, "score")  # features, the two probes, the scores: cached like any stage
        rows.append(select.candidate_row(label, candidate.backbone, ran["score"].results[0],
                                         {h.kind: h for h in ran["heads"].results}))
    rows, taus = select.rank_candidates(rows)
    report = select.write_selection(config.cache_dir, config.name, rows, taus)
    publish_table(f"{config.name}-select", rows, f"{config.name}: candidate backbones")
    return SelectResult(rows=rows, kendall_tau=taus, report=str(report))
