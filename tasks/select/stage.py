"""Transferability scores: rank candidate backbones from their frozen features alone.

- LogME (You et al., ICML 2021): the log maximum evidence of a Bayesian linear
  model from features to each one-hot label column, averaged over classes. The
  evidence is maximised over (alpha, beta) by fixed-point iteration in the
  eigenbasis of F^T F (the "SVD trick"): one D x D decomposition serves every
  class and iteration, so the cost is O(N D^2 + D^3) once.
- H-score (Bao et al., 2019): tr(cov(f)^+ cov(E[f | y])), how much of the feature
  covariance the class means explain.
- NCE (Tran et al., 2019) and LEEP (Nguyen et al., 2020): how well the source
  classifier's outputs predict the target labels; they need a source classifier.

Higher is better for every score.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.atomic import write_text
from storage.layout import CacheLayout
from storage.records import SelectionFiles
from tasks.backbones.config import BackboneConfig
from tasks.heads.stage import load_split
from tasks.select.plan import Candidate, Score, ScorePlan, ScoreResult, SelectConfig, _scores, is_stored, plan_scores  # noqa: F401
from tasks.select.scores import SCORES, h_score, kendall_tau, leep, logme, nce


def score_candidate(plan: ScorePlan) -> ScoreResult:
    """Every score of one candidate's training features (cached as JSON under scores/<key>.json)."""
    started = time.perf_counter()
    if (saved := _scores(plan.cache_dir).read(plan.key)) is not None:
        return ScoreResult.model_validate({**saved, "cache_hit": True, "seconds": 0.0})
    X, y = load_split(plan.cache_dir, plan.train_key, plan.layer)
    scores: dict[str, Score] = {}
    for name, fn in (("logme", logme), ("h_score", h_score)):
        t0 = time.perf_counter()
        scores[name] = Score(value=fn(X, y), seconds=time.perf_counter() - t0)
    from tasks.backbones.models import source_classifier

    classifier = source_classifier(plan.backbone) if plan.layer == "penultimate" else "scores need the penultimate layer"
    if isinstance(classifier, str):
        scores["nce"] = scores["leep"] = Score(value=None, seconds=0.0, skipped=classifier)
    else:
        t0 = time.perf_counter()
        logits = X.astype(np.float64) @ classifier[0].T + classifier[1]
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba /= proba.sum(axis=1, keepdims=True)
        shared = time.perf_counter() - t0
        for name, fn, arg in (("nce", nce, logits.argmax(axis=1)), ("leep", leep, proba)):
            t0 = time.perf_counter()
            scores[name] = Score(value=fn(arg, y), seconds=shared + time.perf_counter() - t0)
    result = ScoreResult(key=plan.key, label=plan.label, scores=scores, cache_hit=False,
                         seconds=time.perf_counter() - started)
    _scores(plan.cache_dir).write(plan.key, {**result.model_dump(mode="json", exclude={"cache_hit", "seconds"}),
                                             "spec": plan.spec})
    return result


def candidate_row(label: str, backbone: BackboneConfig, scored: ScoreResult, probes: dict[str, Any]) -> dict[str, Any]:
    """One candidate: its scores (value, seconds, why skipped) and the kNN and logistic probes' val accuracy."""
    row: dict[str, Any] = {"candidate": label, "backbone": backbone.name, "weights": backbone.weights}
    for name in SCORES:
        s = scored.scores[name]
        row[name], row[f"{name}_s"], row[f"{name}_skipped"] = s.value, s.seconds, s.skipped
    for kind in ("logistic", "knn"):
        rec = probes[kind].records[0]
        row[f"{kind}_val_acc"], row[f"{kind}_s"] = rec.val_accuracy, rec.seconds
    return row


def rank_candidates(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """Rows by LogME, best first, and each score's Kendall tau against the logistic probe's accuracy."""
    rows = sorted(rows, key=lambda r: -r["logme"])
    probe = [r["logistic_val_acc"] for r in rows]
    return rows, {name: kendall_tau([r[name] for r in rows], probe) for name in (*SCORES, "knn_val_acc")}


def write_selection(cache_dir: Path, name: str, rows: list[dict[str, Any]], taus: dict[str, float | None]) -> Path:
    """select.json and select.md of experiment ``name``; returns the markdown's path."""
    files = SelectionFiles(CacheLayout(cache_dir).selection(name))
    write_text(files.json, json.dumps({"rows": rows, "kendall_tau_vs_logistic_probe": taus}, indent=1))
    return write_text(files.markdown, _markdown(name, rows, taus))


def _markdown(name: str, rows: list[dict[str, Any]], taus: dict[str, float | None]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    cols = [*SCORES, "knn_val_acc", "logistic_val_acc"]
    lines = [f"# {name}: candidate backbones, ranked by LogME", "",
             "| candidate | " + " | ".join(cols) + " | LogME s | probe s |", "|---|" + "---|" * (len(cols) + 2)]
    lines += [f"| {r['candidate']} | " + " | ".join(fmt(r[c]) for c in cols) + f" | {r['logme_s']:.3f} | {r['logistic_s']:.2f} |"
              for r in rows]
    lines += ["", "Kendall τ of each score against the logistic probe's val accuracy (1 = same order):", ""]
    lines += [f"- {name}: {fmt(tau)}" for name, tau in taus.items()]
    return "\n".join(lines) + "\n"
