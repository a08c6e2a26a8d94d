"""The experiment report: report.json, report.md and PNG plots in the report folder, and registry rows.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage import results as registry
from storage.atomic import write_text
from tasks.evaluate.plan import EvalPlan, ModelReport
from tasks.evaluate.plots import draw_plots, few_shot_curve
from tasks.heads.plan import CLEANED


def ranked(models: list[ModelReport]) -> list[ModelReport]:
    """Best first by test top-1 (ties keep their order)."""
    return sorted(models, key=lambda r: -r.metrics["top1"])


def recommended(models: list[ModelReport]) -> ModelReport | None:
    """The one model to ship, chosen without the test split: the highest validation top-1 (ties: all labels
    over few-shot, then the cheaper to train). The test ranking is a report; this is a decision."""
    known = [m for m in models if m.val_accuracy is not None and m.val_accuracy == m.val_accuracy]  # not NaN
    if not known:
        return None
    return max(known, key=lambda m: (m.val_accuracy, str(m.shot) == "all", -m.train_seconds))


def recommendation(models: list[ModelReport]) -> dict[str, Any] | None:
    """What report.json and the CLI say of the recommended model, with the key that loads it."""
    pick = recommended(models)
    if pick is None:
        return None
    return {"model": pick.name, "kind": pick.kind, "shots": str(pick.shot), "val_accuracy": pick.val_accuracy,
            "test_top1": pick.metrics["top1"], "test_top1_ci": pick.metrics.get("top1_ci"),
            "artifact": pick.artifacts[0] if pick.artifacts else None}


def recommendation_line(models: list[ModelReport]) -> str | None:
    rec = recommendation(models)
    if rec is None:
        return None
    ci = interval({"top1_ci": rec["test_top1_ci"]}) if rec["test_top1_ci"] else ""
    where = "heads/" if rec["kind"] != "finetune" else "finetune/"
    return (f"Recommended (highest validation top-1; the test split was not used to choose it): {rec['model']}, "
            f"{rec['shots']} labels per class: val {rec['val_accuracy']:.3f}, test {rec['test_top1']:.3f}"
            + (f" ({ci})" if ci else "") + f"; artifact {where}{rec['artifact']}")


def write_report(plan: EvalPlan, models: list[ModelReport], seconds: float, retrieval: dict[str, Any] | None = None,
                 embedding_map: dict[str, Any] | None = None) -> dict[str, Path]:
    """report.json, report.md and PNG plots in the plan's report folder (models ranked); returns their paths.

    ``retrieval``: tasks.index.retrieval's metrics; ``embedding_map``: what tasks.evaluate.projection drew (its PNG is in the
    folder already)."""
    from tasks.machine import versions

    models = ranked(models)
    files = plan.files
    files.folder.mkdir(parents=True, exist_ok=True)
    stages = {**plan.context.get("stages", {}), "evaluate": {"seconds": seconds, "cache_hit": False}}
    context = {
        "experiment": plan.experiment, "backbone": plan.backbone.name, "weights": plan.backbone.weights,
        "classes": plan.classes, **plan.context, "stages": stages,
        "keys": {**plan.context.get("keys", {}), "evaluation": plan.key}, "versions": versions(),
    }
    context["left_out"] = left_out(plan)
    context["cleaning"] = cleaning(models)
    context["recommended"] = recommendation(models)
    context["retrieval"], context["embedding_map"] = retrieval, embedding_map
    payload = {**context, "models": [r.model_dump() for r in models]}
    write_text(files.report_json, json.dumps(payload, indent=1, default=str))
    plots = draw_plots(files, models, plan.classes)
    if embedding_map:
        plots["embedding_map"] = files.folder / embedding_map["file"]
    write_text(files.report_md, report_markdown(models, context, plots))
    return {"json": files.report_json, "md": files.report_md, **plots}


def cleaning(models: list[ModelReport]) -> list[dict[str, Any]]:
    """Each head trained without the label-issue candidates (``<name>-cleaned``, quality.exclude) against the
    same head on every row, same shots and layer: top-1 of both and the gain with its paired 95% interval over
    the test images (None where the two were not scored on the same images)."""
    from tasks.evaluate.intervals import paired_difference, unpack_hits

    by = {(m.name, str(m.shot), m.layer): m for m in models}
    out = []
    for m in models:
        base = by.get((m.name.removesuffix(CLEANED), str(m.shot), m.layer)) if m.name.endswith(CLEANED) else None
        if base is None:
            continue
        row = {"model": m.name, "base": base.name, "shots": str(m.shot), "top1": m.metrics["top1"],
               "base_top1": base.metrics["top1"], "excluded_rows": m.metrics.get("excluded_rows"),
               "gain": m.metrics["top1"] - base.metrics["top1"], "gain_lo": None, "gain_hi": None}
        if m.metrics.get("test_images") == base.metrics.get("test_images") and "hits" in m.metrics and "hits" in base.metrics:
            row["gain"], row["gain_lo"], row["gain_hi"] = paired_difference(
                unpack_hits(m.metrics["hits"]), m.seeds, unpack_hits(base.metrics["hits"]), base.seeds)
        out.append(row)
    return out


def cleaning_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Cleaning (quality.exclude: heads trained without the training label-issue candidates)", "",
             "| model | shots | rows left out | top-1 | on every row | gain (95% paired interval) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spread = "" if r["gain_lo"] is None else f" ({100 * r['gain_lo']:+.1f} to {100 * r['gain_hi']:+.1f})"
        sure = " *" if r["gain_lo"] is not None and (r["gain_lo"] > 0 or r["gain_hi"] < 0) else ""
        lines.append(f"| {r['model']} | {r['shots']} | {r['excluded_rows']} | {r['top1']:.4f} | {r['base_top1']:.4f} "
                     f"| {100 * r['gain']:+.1f} pts{spread}{sure} |")
    return lines + ["", "`*`: the interval excludes zero (cleaning changed top-1 beyond the test set's noise)."]


def left_out(plan: EvalPlan) -> dict[str, list[dict[str, str]]]:
    """Per split, the images its feature file left out (undecodable, or dropped by the scan) with
    ``on_bad_image: skip``."""
    from storage import inventory
    from storage.features import FeatureStore

    store, out = FeatureStore(plan.cache_dir), {}
    for split, key in plan.context.get("keys", {}).get("features", {}).items():
        path = store.path(key)
        skipped = list(inventory.info(store, path).skipped) if path.exists() else []
        if skipped:
            out[split] = skipped
    return out


def registry_rows(plan: EvalPlan, models: list[ModelReport], report: Path,
                  retrieval: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One results-registry row per model, and one for retrieval (model ``retrieval``; its top1 is
    precision@1, the share of queries whose nearest gallery image has their class)."""
    features = plan.context.get("keys", {}).get("features", {})
    quality = quality_columns(plan)
    evaluation = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "experiment": plan.experiment, "run_key": plan.key, "backbone": plan.backbone.name,
                  "weights": plan.backbone.weights, "features_key": features.get("train", plan.test_key),
                  "report": _in_cache(plan.cache_dir, report)}
    pick = recommended(models)
    no_interval = [None, None]
    cleaned = {(c["model"], c["shots"]): c for c in cleaning(models)}
    rows = [
        {**evaluation, "model": r.name, "kind": r.kind, "layer": r.layer, "shots": str(r.shot), "seeds": r.seeds,
         "n_test": r.metrics["n"], **{m: r.metrics.get(m) for m in registry.METRICS},
         **dict(zip(("top1_lo", "top1_hi"), r.metrics.get("top1_ci") or no_interval)),
         "val_accuracy": r.val_accuracy, "recommended": int(r is pick), **quality,
         "leaked_test": r.metrics.get("leaked_test_images"), "excluded_rows": r.metrics.get("excluded_rows"),
         **{f"cleaning_{k}": cleaned.get((r.name, str(r.shot)), {}).get(k) for k in ("gain", "gain_lo", "gain_hi")}}
        for r in models
    ]
    if retrieval:
        rows.append({**evaluation, "model": "retrieval", "layer": retrieval["layer"], "shots": "all", "seeds": 1,
                     "kind": f"retrieval:{retrieval['metric']}" + ("" if retrieval["index"] == "exact" else "+faiss"),
                     "n_test": retrieval["queries"], "top1": retrieval.get("precision_at_1"),
                     **{m: retrieval.get(m) for m in ("map_at_r", "r_precision", "recall_at_1", "recall_at_5",
                                                      "recall_at_10")}})
    return rows


def quality_columns(plan: EvalPlan) -> dict[str, Any]:
    """The registry's quality columns of an evaluation with quality findings: their key and how many training
    label-issue candidates they flagged (empty without findings)."""
    from storage.layout import CacheLayout
    from storage.records import QualityFiles, read_json

    found = read_json(QualityFiles(CacheLayout(plan.cache_dir).quality(plan.quality)).findings) if plan.quality else None
    if not found:
        return {}
    return {"quality_key": plan.quality, "label_issues": len(found["label_issues"]["train"]["flagged"])}


def _in_cache(cache_dir: Path, path: Path) -> str:
    """A path inside the cache relative to its root (the cache can move); any other path as it is."""
    try:
        return Path(path).relative_to(cache_dir).as_posix()
    except ValueError:
        return str(path)


def interval(metrics: dict[str, Any]) -> str:
    """Top-1's 95% bootstrap interval as text ("0.953–0.980"), or "" for metrics computed before intervals."""
    ci = metrics.get("top1_ci")
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else ""


def summary_rows(ranked: list[ModelReport]) -> list[dict[str, Any]]:
    fmt = lambda v: "" if v is None else round(v, 4)  # noqa: E731
    return [
        {"model": r.name, "kind": r.kind, "shots": r.shot, "val top1": fmt(r.val_accuracy), "top1": fmt(r.metrics["top1"]),
         "top1 95% CI": interval(r.metrics), "top5": fmt(r.metrics["top5"]),
         "balanced_acc": fmt(r.metrics["balanced_accuracy"]), "macro_f1": fmt(r.metrics["macro_f1"]),
         "nll": fmt(r.metrics["nll"]), "ece": fmt(r.metrics["ece"]), "train_s": round(r.train_seconds, 2),
         **({"top1 without leaks": fmt(r.metrics["top1_without_leaks"])} if "top1_without_leaks" in r.metrics else {})}
        for r in ranked
    ]


def report_markdown(ranked: list[ModelReport], context: dict[str, Any], plots: dict[str, Path]) -> str:
    rows = summary_rows(ranked)
    header = list(rows[0]) if rows else []
    lines = [f"# {context.get('experiment', 'experiment')}: test results", "",
             f"Backbone `{context.get('backbone')}` (weights `{context.get('weights')}`), "
             f"{ranked[0].metrics['n'] if ranked else 0} test images. Models ranked by top-1 accuracy; its 95% "
             "interval is a bootstrap over the test images (1,000 resamples, seeded).", "",
             *([line, ""] if (line := recommendation_line(ranked)) else []),
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    zero = [(f"{r.name}, {r.shot} labels per class", r.metrics["nll_zero"], r.metrics["n"]) for r in ranked
            if r.metrics.get("nll_zero")]
    if zero:
        lines += ["", "NLL is scikit-learn's `log_loss`: a probability of 0 for the true class counts as machine "
                  "epsilon (-log eps = 36.0 in float64, 15.9 in float32). " +
                  "; ".join(f"`{name}` gave it to {k:.3g} of {n} test images" for name, k, n in zero) +
                  " (a mean where there are several few-shot seeds)."]
    curve = few_shot_curve(ranked)
    if curve:
        shots = sorted({s for points in curve.values() for s in points}, key=lambda s: (s == "all", s if s != "all" else 0))
        lines += ["", "## Few-shot curve (test top-1, mean over seeds; the plot's bars: their standard deviation)", "",
                  "| model | " + " | ".join(str(s) for s in shots) + " |", "|---|" + "---|" * len(shots)]
        lines += [f"| {name} | " + " | ".join(f"{points[s]:.3f}" if s in points else "" for s in shots) + " |"
                  for name, points in curve.items()]
    lines += ["", *(f"![{name}]({path.name})" for name, path in plots.items())]
    left = context.get("left_out", {})
    if left:
        lines += ["", "## Images left out (data.on_bad_image: skip)", ""]
        for split, entries in left.items():
            shown = "; ".join(f"`{e['path']}` ({e['error']})" for e in entries[:10])
            lines.append(f"- {split}: {len(entries)}: {shown}" + (f" and {len(entries) - 10} more" if len(entries) > 10
                                                                  else ""))
    lines += cleaning_markdown(context.get("cleaning") or [])
    lines += retrieval_markdown(context.get("retrieval"))
    drawn = context.get("embedding_map")
    if drawn:
        points = ", ".join(f"{split} {n}" for split, n in drawn["points"].items())
        lines += ["", f"Embedding map above: {drawn['method']}, fitted on the train sample; points drawn: {points}."]
    kept = context.get("finetune_probe")
    if kept:
        tuned = kept["best_tuned_val_accuracy"]
        lines += ["", "Fine-tuning did not beat the probe it started from on validation: the probe reached "
                  f"{kept['probe_val_accuracy']:.3f}, the best fine-tuned epoch "
                  + ("-" if tuned is None else f"{tuned:.3f}") + ". So `finetuned` is that probe on the frozen backbone "
                  "(epoch 0), not a worse model."]
    tried = context.get("finetune_search") or []
    if tried:
        lines += ["", "## Fine-tuning search (chosen on validation; epoch 0 is the probe it starts from)", "",
                  "| settings | best epoch | val top-1 | train s | |", "|---|---|---|---|---|"]
        lines += [f"| {t['settings']} | {t.get('best_epoch', '-')} | "
                  + (f"{t['best_val_accuracy']:.4f}" if "best_val_accuracy" in t else "-")
                  + f" | {t.get('train_seconds', 0.0):.1f} | {'chosen' if t['chosen'] else ''} |" for t in tried]
    lines += lineage_markdown(context.get("keys") or {})
    timings = context.get("stages", {})
    if timings:
        lines += ["", "## Stages", "", "| stage | seconds | cache |", "|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.1f} | {'hit' if v['cache_hit'] else 'computed'} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def lineage_markdown(keys: dict[str, Any]) -> list[str]:
    """Which cached artifacts this evaluation read: each split's feature key, each head's fit key, the
    fine-tuning run, the quality findings (``transferpipe cache ls`` and ``cache rm`` take these keys)."""
    if not keys:
        return []
    lines = ["", "## Lineage (cache keys: `transferpipe cache ls`)", "", "| artifact | key |", "|---|---|"]
    lines += [f"| features: {split} | `{key}` |" for split, key in (keys.get("features") or {}).items()]
    lines += [f"| head: {name} | `{key}` |" for name, key in (keys.get("heads") or {}).items() if key]
    lines += [f"| {what} | `{keys[what]}` |" for what in ("finetune", "quality", "evaluation") if keys.get(what)]
    return lines


def retrieval_markdown(found: dict[str, Any] | None) -> list[str]:
    """The report's retrieval section: every metric, and what was searched."""
    if not found:
        return []
    from tasks.index.retrieval import label, metric_names

    names = metric_names(found["k"])
    gallery = (f"leave-one-out within the test split ({found['gallery']} images)" if found["leave_one_out"]
               else f"the train split ({found['gallery']} images)")
    lines = ["", "## Retrieval (test images as queries)", "",
             f"Gallery: {gallery}; {found['metric']} similarity on layer `{found['layer']}`, "
             f"{'exact search' if found['index'] == 'exact' else 'FAISS index'}; {found['queries']} queries"
             + (f" ({found['queries_without_relevant']} left out: no image of their class in the gallery)"
                if found["queries_without_relevant"] else "") + f"; {found['seconds']:.1f} s.", "",
             "| " + " | ".join(label(n) for n in names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join("-" if found.get(n) is None else f"{found[n]:.4f}" for n in names) + " |"]
    if found.get("index_recall") is not None:
        lines += ["", f"The index found {found['index_recall']:.4f} of the exact search's {found['index_k']} nearest "
                      f"neighbours (recall lost: {1 - found['index_recall']:.4f})."]
    return lines


def compare_runs(pretrained: list[ModelReport], random: list[ModelReport],
                 more: dict[str, list[ModelReport]] | None = None) -> list[dict[str, str]]:
    """Test top-1 per model and shot count: a pretrained backbone against random init, and the gain in points.

    Each top-1 comes with its 95% bootstrap interval over the test images; the gain with a paired one
    (the same test images resampled for both), marked ``*`` where it excludes zero. ``more`` adds a column
    per further baseline (e.g. raw pixels), matched by model name and shots.
    """
    def by_key(models: list[ModelReport]) -> dict[tuple[str, str], ModelReport]:
        return {(m.name, str(m.shot)): m for m in models}

    def cell(m: ModelReport | None) -> str:
        if m is None:
            return "-"
        ci = interval(m.metrics)
        return f"{m.metrics['top1']:.3f}" + (f" ({ci})" if ci else "")

    other, extra = by_key(random), {label: by_key(models) for label, models in (more or {}).items()}
    rows = []
    for m in pretrained:
        base = other.get((m.name, str(m.shot)))
        row = {"model": "LP-FT (fine-tuned)" if m.name == "finetuned" else m.name, "shots": str(m.shot),
               "pretrained": cell(m), "random": cell(base)}
        for label, models in extra.items():
            row[label] = cell(models.get((m.name, str(m.shot))))
        row["gain"] = "-" if base is None else gain(m, base)
        rows.append(row)
    order = {"1": 0, "5": 1, "10": 2, "all": 3}
    return sorted(rows, key=lambda r: (r["model"], order.get(r["shots"], 9)))


def gain(a: ModelReport, b: ModelReport) -> str:
    """a's top-1 minus b's in points, with the paired 95% interval when both were scored on the same test
    images ("+5.3 pts (+3.1 to +7.6) *"; ``*``: the interval excludes zero)."""
    from tasks.evaluate.intervals import paired_difference, unpack_hits

    plain = f"{100 * (a.metrics['top1'] - b.metrics['top1']):+.1f} pts"
    same = a.metrics.get("test_images") is not None and a.metrics.get("test_images") == b.metrics.get("test_images")
    if not same or "hits" not in a.metrics or "hits" not in b.metrics:
        return plain
    diff, lo, hi = paired_difference(unpack_hits(a.metrics["hits"]), a.seeds, unpack_hits(b.metrics["hits"]), b.seeds)
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{100 * diff:+.1f} pts ({100 * lo:+.1f} to {100 * hi:+.1f}){mark}"
