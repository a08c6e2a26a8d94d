"""``transferpipe export`` and ``index``: cached features out as Parquet or NumPy, and a FAISS index over a split
(their stages' commands with flags of their own; predict and export-model are derived from declarations)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli import views
from flows.cli.console import CacheDir, friendly_errors, out, print_table
from flows.cli.running import ConfigArg, load, pipeline


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
    from flows.cli.stage_commands import with_flags

    cfg = with_flags(load(config, cache_dir), "export", ExportConfig,
                      {"splits": split, "layer": layer, "format": format, "dtype": dtype})
    wanted = cfg.export
    result = pipeline(config, cache_dir, "export", cfg)[1]
    views.exports(f"export of {cfg.name} ({wanted.format}, layer {wanted.layer})", result.exports)
    paths = copy_out(result.exports, out_dir) if out_dir is not None else [p for r in result.exports for p in r.paths]
    out.print("\n".join(str(p) for p in paths), highlight=False, soft_wrap=True)


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

    from flows.cli.stage_commands import with_flags

    cfg = with_flags(load(config, cache_dir), "index", IndexConfig,
                      {"split": split, "kind": kind, "metric": metric, "layer": layer})
    wanted = cfg.index
    r = pipeline(config, cache_dir, "index", cfg)[1].index
    figures = [("kind", f"{r.kind} ({'cached' if r.cache_hit else 'built'})"), ("rows x dims", f"{r.rows} x {r.dim}"),
               (f"recall@{r.k} vs exact ({r.queries} held-out queries)", f"{r.recall_at_k:.4f}"),
               ("build", f"{r.build_seconds:.2f} s"), ("size", f"{r.index_bytes / 2**20:.1f} MiB"),
               ("peak RSS", f"{r.peak_rss_bytes / 2**20:.0f} MiB"), ("queries/s: index", f"{r.qps_index:,.0f}"),
               ("queries/s: exact search", f"{r.qps_exact:,.0f}"), ("speed-up", f"{r.speedup:.1f}x")]
    print_table(f"FAISS index of {cfg.name}, {r.split} split ({wanted.metric})", ["figure", "value"],
                [list(f) for f in figures])
    out.print(f"index: {r.path}", highlight=False, soft_wrap=True)
