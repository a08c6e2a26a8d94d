"""The ``select`` flow: rank candidate backbones from cached features before training any of them."""
from __future__ import annotations

import json
import re

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from flows.config import ExperimentConfig, as_config
from flows.extract import extract_flow
from flows.heads import heads_flow
from flows.stages import STAGE_TASK_OPTIONS, experiment_run_name, run_stage
from tasks.backbones import resolve
from tasks.head_stage import KNNConfig, LogisticConfig
from tasks.select import ScorePlan, ScoreResult, is_stored, kendall_tau, plan_scores, score_candidate

SCORES = ("logme", "h_score", "nce", "leep")


@task(name="score-candidate", **STAGE_TASK_OPTIONS)
def score_task(plan: ScorePlan) -> ScoreResult:
    return score_candidate(plan)


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
        features = extract_flow(cfg)
        heads = {h.kind: h for h in heads_flow(cfg, features)}
        plan = plan_scores(cand.label, features["train"].key, layer, config.cache_dir, resolve(cand.backbone))
        scored = run_stage(score_task, plan, stored=is_stored(plan), name=f"score-{cand.label}",
                           retries=config.retries, retry_delay_s=config.retry_delay_s)
        row = {"candidate": cand.label, "backbone": cand.backbone.name, "weights": cand.backbone.weights}
        for name in SCORES:
            s = scored.scores[name]
            row[name], row[f"{name}_s"], row[f"{name}_skipped"] = s.value, s.seconds, s.skipped
        for kind in ("logistic", "knn"):
            rec = heads[kind].records[0]
            row[f"{kind}_val_acc"], row[f"{kind}_s"] = rec.val_accuracy, rec.seconds
        rows.append(row)
    rows.sort(key=lambda r: -r["logme"])
    probe = [r["logistic_val_acc"] for r in rows]
    taus = {name: kendall_tau([r[name] for r in rows], probe) for name in (*SCORES, "knn_val_acc")}
    folder = config.cache_dir / "select" / config.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "select.json").write_text(json.dumps({"rows": rows, "kendall_tau_vs_logistic_probe": taus}, indent=1))
    (folder / "select.md").write_text(_markdown(config.name, rows, taus))
    key = re.sub(r"[^a-z0-9-]+", "-", config.name.lower()).strip("-") or "experiment"
    create_table_artifact(table=rows, key=f"{key}-select", description=f"{config.name}: candidate backbones")
    return SelectResult(rows=rows, kendall_tau=taus, report=str(folder / "select.md"))


def _markdown(name: str, rows: list[dict], taus: dict[str, float | None]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    cols = [*SCORES, "knn_val_acc", "logistic_val_acc"]
    lines = [f"# {name}: candidate backbones, ranked by LogME", "",
             "| candidate | " + " | ".join(cols) + " | LogME s | probe s |", "|---|" + "---|" * (len(cols) + 2)]
    lines += [f"| {r['candidate']} | " + " | ".join(fmt(r[c]) for c in cols) + f" | {r['logme_s']:.3f} | {r['logistic_s']:.2f} |"
              for r in rows]
    lines += ["", "Kendall τ of each score against the logistic probe's val accuracy (1 = same order):", ""]
    lines += [f"- {name}: {fmt(tau)}" for name, tau in taus.items()]
    return "\n".join(lines) + "\n"
