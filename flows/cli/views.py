"""What the commands print: each result as a table that reads at 80 columns.

A table shows the columns that fit a terminal 80 columns wide; ``--wide`` shows every column (the line is
as long as it needs, as ``kubectl get -o wide`` does) and ``-o json`` prints the records themselves for
scripts. Values never wrap inside a cell (``resn/et18``); only free text (names, titles) may fold.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.console import out
from storage.keys import short

Wide = Annotated[bool, typer.Option("--wide", help="Every column (lines longer than the terminal).")]
Output = Annotated[str, typer.Option("--output", "-o", help="table (default) or json (every field of every row).")]


@dataclass(frozen=True)
class Col:
    """A table column: its header, whether only ``--wide`` shows it, and whether its text may fold."""

    name: str
    wide_only: bool = False
    fold: bool = False


def check_output(output: str) -> str:
    if output not in ("table", "json"):
        raise ValueError(f"--output {output!r}: use table or json")
    return output


def show(title: str, cols: list[Col], rows: list[list[str]], *, wide: bool = False, caption: str | None = None) -> None:
    """A table on stdout: the narrow columns, or with ``wide`` all of them at their natural width."""
    from rich import box
    from rich.table import Table

    keep = [i for i, c in enumerate(cols) if wide or not c.wide_only]
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left",
                  pad_edge=False, collapse_padding=True)
    for i in keep:
        table.add_column(cols[i].name, no_wrap=not cols[i].fold, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    if wide:  # as wide as the table needs, whatever the terminal
        from rich.console import Console

        natural = Console(width=100_000).measure(table).maximum
        Console(width=max(out.width, natural), markup=False, highlight=False).print(table)
    else:
        out.print(table)


def print_json(records: list[dict[str, Any]]) -> None:
    sys.stdout.write(json.dumps(records, indent=2, default=str) + "\n")


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def features(cfg: Any, results: dict[str, Any]) -> None:
    cols = [Col("split"), Col("rows"), Col("dims"), Col("skipped"), Col("cache"), Col("seconds"), Col("key")]
    rows = [[split, str(r.rows), " ".join(f"{k}={v}" for k, v in r.dims.items()), str(r.skipped),
             "hit" if r.cache_hit else "computed", f"{r.seconds:.1f}", short(r.key)] for split, r in results.items()]
    show(f"features of {cfg.name} ({cfg.backbone.name}, weights {cfg.backbone.weights})", cols, rows)
    out.print(f"feature files: {next(iter(results.values())).path.parent}/<key>.h5", highlight=False, soft_wrap=True)


def heads(results: list[Any]) -> None:
    cols = [Col("head", fold=True), Col("kind"), Col("layer"), Col("shots"), Col("val acc"), Col("best"),
            Col("fits"), Col("seconds")]
    rows = []
    for r in results:
        for shot, s in r.summary().items():
            best = [rec.best_param for rec in r.records if str(rec.shot) == shot]
            spread = f" ± {s['std']:.3f}" if s["n"] > 1 else ""
            rows.append([r.name, r.kind, r.layer, shot, f"{s['mean']:.3f}{spread}", ", ".join(f"{b:g}" for b in best[:3]),
                         "cached" if r.cache_hit else str(r.fits), f"{r.seconds:.1f}"])
    if all(row[2] == "penultimate" for row in rows):  # the usual case: the column says nothing
        cols, rows = cols[:2] + cols[3:], [row[:2] + row[3:] for row in rows]
    show("heads (validation accuracy; mean ± std over few-shot seeds)", cols, rows)


def sweep(name: str, result: Any) -> None:
    cols = [Col("experiment", fold=True), Col("best model", fold=True), Col("shots"), Col("top-1"), Col("macro-F1"),
            Col("forward batches"), Col("head fits")]
    rows = [[r["experiment"], r["best model"], r["shots"], fmt(r["top1"]), fmt(r["macro_f1"]),
             str(r["forward batches"]), str(r["head fits"])] for r in result.rows()]
    show(f"sweep {name}: experiments by their best model's test top-1", cols, rows)


def run(result: Any, wide: bool = False) -> None:
    from tasks.evaluate.report import interval, recommendation_line

    cols = [Col("model", fold=True), Col("kind", wide_only=True), Col("shots"), Col("val top-1"), Col("top-1"),
            Col("95% CI"), Col("macro-F1", wide_only=True), Col("ECE"), Col("NLL"), Col("train s")]
    rows = []
    for r in result.models:
        m = r.metrics
        rows.append([r.name, r.kind, str(r.shot), fmt(r.val_accuracy), fmt(m["top1"]), interval(m), fmt(m["macro_f1"]),
                     fmt(m["ece"]), fmt(m["nll"]), f"{r.train_seconds:.1f}"])
    show(f"{result.experiment}: test results (best first)", cols, rows, wide=wide,
         caption=None if wide else "kind and macro-F1: --wide; every figure: the report")
    if line := recommendation_line(result.models):
        out.print(line, highlight=False)
    found = result.evaluation.retrieval if result.evaluation else None
    if found:
        from tasks.index.retrieval import label, metric_names

        figures = ", ".join(f"{label(n)} {fmt(found.get(n))}" for n in metric_names(found["k"]) if "precision_at" not in n)
        out.print(f"retrieval ({found['queries']} test queries, {found['metric']}, {found['index']}): {figures}",
                  highlight=False)
    if result.quality is not None:
        quality(result.quality)
    from tasks.evaluate.report import cleaning

    for c in cleaning(result.models):
        spread = "" if c["gain_lo"] is None else f" (95% paired interval {100 * c['gain_lo']:+.1f} to {100 * c['gain_hi']:+.1f})"
        out.print(f"cleaning: {c['model']} ({c['shots']} shots, {c['excluded_rows']} flagged rows left out) top-1 "
                  f"{fmt(c['top1'])} vs {fmt(c['base_top1'])}: {100 * c['gain']:+.1f} pts{spread}", highlight=False)
    stages = ", ".join(f"{k} {v['seconds']:.1f}s ({'hit' if v['cache_hit'] else 'computed'})" for k, v in result.stages.items())
    out.print(f"stages: {stages}", highlight=False)
    out.print(f"report: {result.report}", highlight=False, soft_wrap=True)


def results(rows: list[dict[str, Any]], title: str, wide: bool) -> None:
    """The results registry: at 80 columns the experiment, model, shots, backbone, test top-1 and its interval."""
    cols = [Col("experiment", fold=True), Col("model", fold=True), Col("shots"), Col("backbone", fold=True),
            Col("weights", wide_only=True), Col("val top1", wide_only=True), Col("top1"), Col("95% CI"),
            Col("macro_f1", wide_only=True), Col("ece", wide_only=True), Col("mAP@R", wide_only=True),
            Col("features", wide_only=True), Col("when", wide_only=True)]
    table = []
    for r in rows:
        ci = f"{r['top1_lo']:.3f}–{r['top1_hi']:.3f}" if r.get("top1_lo") is not None else ""
        pick = " ✓" if r.get("recommended") else ""  # the experiment's model chosen on validation
        table.append([r["experiment"], r["model"] + pick, r["shots"], r["backbone"], Path(r["weights"]).name,
                      fmt(r.get("val_accuracy")), fmt(r["top1"]), ci, fmt(r["macro_f1"]), fmt(r["ece"]),
                      fmt(r.get("map_at_r")), short(r["features_key"]), r["created_at"][:16]])
    show(title, cols, table, wide=wide, caption=None if wide else "more columns: --wide; every field: -o json")


def select(title: str, result: Any) -> None:
    from tasks.select.scores import SCORES

    cols = [Col("candidate", fold=True), *(Col(s) for s in SCORES), Col("kNN val"), Col("probe val"),
            Col("LogME s"), Col("probe s")]
    rows = [[r["candidate"], *(fmt(r[s], ".4g") for s in SCORES), fmt(r["knn_val_acc"], ".4g"),
             fmt(r["logistic_val_acc"], ".4g"), f"{r['logme_s']:.3f}", f"{r['logistic_s']:.2f}"] for r in result.rows]
    show(title, cols, rows)
    taus = ", ".join(f"{k} {fmt(v, '.4g')}" for k, v in result.kendall_tau.items())
    out.print(f"Kendall tau vs probe accuracy: {taus}", highlight=False)
    out.print(f"report: {result.report}", highlight=False, soft_wrap=True)


def exports(title: str, results: list[Any]) -> None:
    cols = [Col("split"), Col("rows"), Col("dim"), Col("dtype"), Col("MB"), Col("cache"), Col("seconds"), Col("key")]
    rows = [[r.split, str(r.rows), str(r.dim), r.dtype, f"{sum(r.files.values()) / 1e6:.1f}",
             "hit" if r.cache_hit else "written", f"{r.seconds:.1f}", short(r.key)] for r in results]
    show(title, cols, rows)


def finetune(title: str, result: Any) -> None:
    cols = [Col("epoch"), Col("train loss"), Col("val loss"), Col("val acc"), Col("img/s"), Col("lr backbone"),
            Col("lr head")]
    rows = []
    for h in result.history:
        mark = " *" if h.epoch == result.best_epoch else ""
        if h.epoch == 0:
            rows.append([f"0 (probe){mark}", "-", f"{h.val_loss:.4f}", f"{h.val_accuracy:.4f}", "-", "-", "-"])
            continue
        rows.append([f"{h.epoch}{mark}", f"{h.train_loss:.4f}", f"{h.val_loss:.4f}", f"{h.val_accuracy:.4f}",
                     f"{h.images_per_s:.0f}", f"{h.lr_backbone:.2e}", f"{h.lr_head:.2e}"])
    show(title, cols, rows)


def quality(result: Any) -> None:
    """One line per finding, and where the pictures are."""
    pairs = ", ".join(f"{name} {n}" for name, n in result.duplicates.items())
    out.print(f"near-duplicate pairs: {pairs} ({result.exact_duplicates} byte-identical)", highlight=False)
    if result.pixel_duplicates:
        by_pixels = ", ".join(f"{name} {n}" for name, n in result.pixel_duplicates.items())
        out.print(f"near-duplicate pairs by pixels: {by_pixels}", highlight=False)
    out.print(f"leaks: {result.leaked_test} test image(s) with a near-duplicate in train or val", highlight=False)
    issues = ", ".join(f"{split} {n}" for split, n in result.label_issues.items())
    out.print(f"label-issue candidates: {issues}", highlight=False)
    outliers = ", ".join(f"{split} {n}" for split, n in result.outliers.items())
    out.print(f"outliers listed: {outliers}", highlight=False)
    out.print(f"quality report: {result.report}", highlight=False, soft_wrap=True)


def demo_batch(result: Any, flagged: dict[str, list[int]]) -> None:
    """The demo's last mile: the new batch scored, in two lines."""
    digits, other = flagged.get("scanner2", [0, 0]), flagged.get("other", [0, 0])
    out.print(f"new batch ({result.rows} unlabelled images, {result.model}): {result.single} single-label sets, "
              f"{result.empty} empty (no label sure enough: for a person) at "
              f"{result.test.get('coverage', float('nan')):.2f} test coverage; flagged out of distribution: "
              f"{other[0]} of {other[1]} pictures of another kind, {digits[0]} of {digits[1]} new digits"
              + (f" (OOD score vs the test split: AUROC {ood['auroc']:.3f}, FPR95 {ood['fpr95']:.3f})"
                 if (ood := result.test.get("ood")) else ""), highlight=False)
    out.print(f"predictions: {result.path}", highlight=False, soft_wrap=True)


def comparison(title: str, columns: list[str], rows: list[list[str]], *, wide: bool = False,
               markdown: bool = False) -> None:
    """The demo's comparison: ``columns`` are model, labels per class, one top-1 column per backbone and the
    gain. At 80 columns each top-1 shows without its interval (the gain keeps its own: it says whether the
    difference is real), so no number is cut; ``--wide`` and ``--markdown`` (the README's) show everything."""
    from flows.cli.console import print_table

    if markdown:
        print_table(title, columns, rows, markdown=True)
        return
    if wide:
        show(title, [Col(c) for c in columns], rows, wide=True)
        return
    short = {"pretrained on scanner 1": "pretrained", "random init": "random", "raw pixels": "pixels"}
    narrow = ["model", "labels", *(short.get(c, c) for c in columns[2:-1]), "gain (95% CI)"]
    values = [[*row[:2], *(cell.split(" (")[0] for cell in row[2:-1]), row[-1]] for row in rows]
    show(title, [Col(c) for c in narrow], values,
         caption="top-1 on the test images; their 95% intervals: --wide, or the report")
