"""``transferpipe cache``: list, verify, remove and collect feature files.

Exit codes a script can rely on: 0 success; 1 a problem found (verify: a corrupt
file; rm: a key is being written); 2 bad input (unknown or ambiguous key).
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.defaults import default_cache_dir
from flows.cli import views
from flows.cli.console import CacheDir, friendly_errors, out, styled
from storage import inventory
from storage.features import FeatureStore
from storage.keys import short

app = typer.Typer(no_args_is_help=True, help="Inspect and manage the feature cache (HDF5 files by content key).")

DryRun = Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")]


def _store(cache_dir: Path | None) -> FeatureStore:
    return FeatureStore(default_cache_dir(cache_dir))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _keys(store: FeatureStore, prefixes: list[str]) -> list[str]:
    try:
        return store.resolve_keys(prefixes)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


@app.command("ls")
@friendly_errors
def ls(wide: views.Wide = False, output: views.Output = "table", cache_dir: CacheDir = None) -> None:
    """One row per feature file: key, backbone, dataset, split, rows x dims, size, state (--wide: weights,
    dtype, dates; -o json: every field)."""
    views.check_output(output)
    store = _store(cache_dir)
    entries = inventory.entries(store)
    if output == "json":
        return views.print_json([dataclasses.asdict(e) for e in entries])
    done, partial, size = inventory.pieces_summary(store)
    cols = [views.Col("key"), views.Col("backbone", fold=True), views.Col("weights", wide_only=True, fold=True),
            views.Col("dataset", fold=True), views.Col("split"), views.Col("rows x dims"),
            views.Col("dtype", wide_only=True), views.Col("size"), views.Col("created", wide_only=True),
            views.Col("used", wide_only=True), views.Col("state")]
    rows = []
    for e in entries:
        spec = e.spec
        used = datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M") if e.last_used else "-"
        state = "complete" if e.complete else ("unreadable" if e.error else "partial")
        dims = "+".join(str(d) for d in e.dims.values())
        rows.append([short(e.key), spec.get("backbone", "?"), spec.get("weights", "?"), Path(e.dataset_root).name or "?",
                     spec.get("split", "?"), f"{e.rows} x {dims}", spec.get("dtype", "?"), _size(e.size_bytes),
                     e.created_at[:16].replace("T", " ") or "-", used, state])
    caption = (f"joined from {done} piece(s), {_size(size)} in {store.pieces().root}"
               + (f"; {partial} partial piece(s): an extraction in progress or interrupted" if partial else ""))
    views.show(f"{len(entries)} feature file(s) in {store.root}", cols, rows, wide=wide,
               caption=caption + ("" if wide else "\nmore columns: --wide; every field: -o json"))


@app.command()
@friendly_errors
def verify(
    keys: Annotated[Optional[list[str]], typer.Argument(help="Keys or unique prefixes; default all.")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Recompute every checksum. A corrupt file is reported and quarantined (exit 1), so no run uses it."""
    store = _store(cache_dir)
    chosen = _keys(store, keys) if keys else list(store.keys())
    bad = 0
    for key in chosen:
        if not store.path(key).exists():
            out.print(f"{short(key)}  partial (not verified: an extraction in progress or interrupted)")
            continue
        problems = store.verify(key)
        if not problems:
            out.print(f"{short(key)}  ok  {store.path(key)}", highlight=False, soft_wrap=True)
            continue
        bad += 1
        moved = store.quarantine(store.path(key), "corrupt", "; ".join(problems))
        out.print(styled(f"{short(key)}  CORRUPT", "red", f"  {'; '.join(problems)} -> moved to {moved}"),
                  highlight=False, soft_wrap=True)
    out.print(f"{len(chosen)} checked, {bad} corrupt")
    if bad:
        raise typer.Exit(1)

@app.command()
@friendly_errors
def rm(
    keys: Annotated[list[str], typer.Argument(help="Keys or unique prefixes.", show_default=False)],
    cache_dir: CacheDir = None,
    dry_run: DryRun = False,
) -> None:
    """Remove what a key names: feature files (complete and partial), or any later stage's stored result (a head, a
    fine-tuning run, a report, metrics, a map, a stage folder's entry); the next run that needs them recomputes
    them."""
    store = _store(cache_dir)
    features = [k for k in keys if any(f.startswith(k.lower()) for f in store.all_keys())]
    paths = [p for key in _keys(store, features) for p in store.remove(key, dry_run=dry_run)]
    others = [k for k in keys if k not in features]
    try:
        paths += inventory.remove_artifacts(default_cache_dir(cache_dir), others, dry_run=dry_run) if others else []
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    for path in paths:
        out.print(f"{'would remove' if dry_run else 'removed'} {path}", highlight=False, soft_wrap=True)

@app.command()
@friendly_errors
def gc(
    partial_hours: Annotated[float, typer.Option("--partial-hours", help="Remove partial files untouched this long.")] = 24.0,
    unused_days: Annotated[
        Optional[float], typer.Option("--unused-days", help="Also remove complete files not used for this many days.")
    ] = None,
    cache_dir: CacheDir = None,
    dry_run: DryRun = False,
) -> None:
    """Remove stale partial files (never one whose writer still runs), pieces no feature file joins, what interrupted
    writes left (*.tmp, half-written heads), scans of shards that changed and, optionally, unused complete files.
    Links are removed, never followed."""
    store = _store(cache_dir)
    unused = unused_days * 86400 if unused_days is not None else None
    removed = inventory.collect(store, partial_hours * 3600, unused, dry_run=dry_run)
    removed += inventory.collect_temporary(default_cache_dir(cache_dir), partial_hours * 3600, dry_run=dry_run)
    removed += inventory.collect_scans(default_cache_dir(cache_dir), dry_run=dry_run)
    for path, why in removed:
        out.print(f"{'would remove' if dry_run else 'removed'} {path} ({why})", highlight=False, soft_wrap=True)
    out.print(f"{len(removed)} file(s) {'would be ' if dry_run else ''}removed")
