"""The results registry: one row per evaluated model, across every experiment.

SQLite (standard library, one file at ``<cache_dir>/results.sqlite``): safe
for concurrent writers, queryable with plain SQL or pandas, and nothing to
install. JSONL would need a reader to filter and sort; Parquet needs pyarrow
and rewrites files to append.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from storage.layout import CacheLayout

COLUMNS = {
    "created_at": "TEXT", "experiment": "TEXT", "run_key": "TEXT", "model": "TEXT", "kind": "TEXT", "layer": "TEXT",
    "shots": "TEXT", "seeds": "INTEGER", "backbone": "TEXT", "weights": "TEXT", "features_key": "TEXT",
    "n_test": "INTEGER", "top1": "REAL", "top5": "REAL", "balanced_accuracy": "REAL", "macro_f1": "REAL",
    "nll": "REAL", "ece": "REAL", "report": "TEXT",
}
METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1", "nll", "ece")


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
    conn.execute(f"CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, {cols})")
    return conn


def registry_path(cache_dir: str | Path) -> Path:
    return CacheLayout(cache_dir).registry()


def append(cache_dir: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    rows = [{k: row.get(k) for k in COLUMNS} for row in rows]
    with closing(_connect(registry_path(cache_dir))) as conn, conn:
        conn.executemany(
            f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + k for k in COLUMNS)})", rows
        )
    return len(rows)


def query(cache_dir: str | Path, experiment: str | None = None, sort: str = "top1") -> list[dict[str, Any]]:
    """Rows, best first by ``sort`` (lower is better for nll and ece); ``experiment`` may be a glob (``sweep-*``)."""
    if sort not in METRICS:
        raise ValueError(f"--sort {sort!r} is not one of {', '.join(METRICS)}")
    path = registry_path(cache_dir)
    if not path.exists():
        return []
    order = "ASC" if sort in ("nll", "ece") else "DESC"
    op = "GLOB" if experiment and any(c in experiment for c in "*?[") else "="
    where, args = (f"WHERE experiment {op} ?", (experiment,)) if experiment else ("", ())
    with closing(_connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        sql = f"SELECT * FROM results {where} ORDER BY {sort} IS NULL, {sort} {order}, id"
        return [dict(r) for r in conn.execute(sql, args)]
