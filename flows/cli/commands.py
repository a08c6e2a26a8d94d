"""The ``transferpipe`` command: the app, the commands of the experiment (extract, heads, run, plan, select,
quality, finetune, results) and the others' registration (service.py, outputs.py, demo_cli.py, cache_cli.py,
server_cli.py; the declared stages' commands come from stage_commands.py when asked for)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from flows.cli import cache_cli, demo_cli, outputs, server_cli, service, views
from flows.cli.console import CacheDir, err, friendly_errors, out, styled
from flows.cli.running import ConfigArg, SweepFile, load, pipeline, run_local, setup_logging
from flows.defaults import default_cache_dir


class StageCommands(TyperGroup):
    """The commands written here, and those the stages declare (flows/cli/stage_commands.py), built only when asked
    for: ``results`` or ``server start`` import no plan module; ``--help`` lists them all."""

    def list_commands(self, ctx):
        from flows.cli.stage_commands import declared

        return super().list_commands(ctx) + sorted(declared())

    def get_command(self, ctx, name):
        found = super().get_command(ctx, name)
        if found is None:
            from flows.cli.stage_commands import click_command

            found = click_command(name, pipeline, load)
        return found


app = typer.Typer(
    cls=StageCommands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Batch transfer learning on images: run the frozen backbone once, cache features, train heads in seconds.",
)

@app.command()
@friendly_errors
def extract(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Extract frozen-backbone features of every split into the HDF5 cache (the pipeline up to extract)."""
    cfg, result = pipeline(config, cache_dir, "extract")
    views.features(cfg, result.features)


@app.command()
@friendly_errors
def heads(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Train every head of the config on its cached features (extracting them first if needed)."""
    cfg, result = pipeline(config, cache_dir, "heads")
    views.features(cfg, result.features)
    views.heads(result.heads)



@app.command()
@friendly_errors
def run(config: ConfigArg, sweep: SweepFile = None, wide: views.Wide = False, cache_dir: CacheDir = None) -> None:
    """The whole pipeline: extract → heads → finetune (if enabled) → evaluate; prints the ranking and the report.

    With --sweep (or a sweep: section) it runs every experiment of the sweep,
    concurrently, each distinct feature key extracted once, and compares them.
    """
    cfg = load(config, cache_dir)
    if sweep is not None or cfg.sweep is not None:
        _sweep(config, sweep, cache_dir)
        return
    result = pipeline(config, cache_dir, "evaluate", cfg)[1]
    views.run(result, wide)
    from flows.cli import stage_commands

    for stage in stage_commands.STAGES:  # a stage that joins a run (predict:) prints as its command does
        if "evaluate" in stage.joins and stage.command and result.outputs.get(stage.name):
            stage_commands.show(stage, cfg, result.outputs[stage.name])


def _sweep(config: Path, sweep: Path | None, cache_dir: Path | None) -> None:
    from flows.config import load_sweep
    from flows.experiments.sweep import run_sweep

    spec, configs = load_sweep(config, sweep, cache_dir)
    name = spec.name
    out.print(f"sweep {name}: {len(configs)} experiment(s), {spec.concurrency} at a time", highlight=False)
    state = run_local(run_sweep, spec, name, configs)
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
        cfg = load(config, cache_dir)
        configs = load_sweep(config, sweep, cache_dir)[1] if sweep is not None or cfg.sweep is not None else [cfg]
        for experiment in configs:
            items = explain(experiment)
            todo = sum(not i.cached for i in items)
            units = sum(i.stage != "note" for i in items)
            out.print(styled(experiment.name, "bold", f": {units - todo} cached, {todo} to compute"), highlight=False)
            out.print("\n".join(render(items)), highlight=False, markup=False, soft_wrap=True)


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
    cfg = load(config, cache_dir)
    from flows.experiments.selection import select_flow

    views.select(f"{cfg.name}: candidate backbones, ranked by LogME", run_local(select_flow, cfg))



@app.command()
@friendly_errors
def quality(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Near-duplicates and train/test leaks, label-issue candidates and outliers, from the cached features
    (extracting first if needed); a report with contact sheets under <cache_dir>/quality/<key>/."""
    views.quality(pipeline(config, cache_dir, "quality")[1].quality)


@app.command("finetune")
@friendly_errors
def finetune_cmd(config: ConfigArg, cache_dir: CacheDir = None) -> None:
    """Fine-tune the unfrozen blocks end to end (LP-FT from the best probe); resumes an interrupted run."""
    cfg, run = pipeline(config, cache_dir, "finetune")
    result = run.finetune
    views.finetune(f"fine-tuning {cfg.backbone.name} ({'cached' if result.cache_hit else 'trained'})", result)
    if result.best_epoch == 0:
        out.print("no epoch of fine-tuning beat the probe it started from on validation: best.pt is the probe on "
                  "the frozen backbone (epoch 0)", highlight=False)
    out.print(f"best (epoch {result.best_epoch}, val acc {result.best_val_accuracy:.4f}), to use as another "
              "experiment's backbone.weights:", highlight=False)
    out.print(str(result.best_checkpoint), highlight=False, soft_wrap=True)


for command in (service.serve, service.watch, outputs.export, demo_cli.demo):
    app.command()(command)
app.command("index")(outputs.index_cmd)
app.add_typer(cache_cli.app, name="cache")
app.add_typer(server_cli.app, name="server")


def main() -> None:
    setup_logging()
    app()

