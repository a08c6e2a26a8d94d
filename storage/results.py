"""The results registry: one row per evaluated model, across every experiment.

SQLite (standard library, one file at ``<cache_dir>/results.sqlite``): safe
for concurrent writers, queryable with plain SQL or pandas, and nothing to
install. JSONL would need a reader to filter and sort; Parquet needs pyarrow
and rewrites files to append.

A model of an evaluation is one row, whatever happens: rows are keyed by
(evaluation key, model, shots) and written as upserts, so a re-evaluation or
two identical runs at once leave one row each. A registry that is not a
database is moved aside (named in the warning) and a new one started.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path
import logging
import os
import time
from typing import Any

from storage.layout import CacheLayout

log = logging.getLogger("transferpipe.results")

COLUMNS = {
    "created_at": "TEXT", "experiment": "TEXT", "run_key": "TEXT", "model": "TEXT", "kind": "TEXT", "layer": "TEXT",
    "shots": "TEXT", "seeds": "INTEGER", "backbone": "TEXT", "weights": "TEXT", "features_key": "TEXT",
    "n_test": "INTEGER", "top1": "REAL", "top5": "REAL", "balanced_accuracy": "REAL", "macro_f1": "REAL",
    "nll": "REAL", "ece": "REAL", "report": "TEXT",
    # since 0.6: top-1's 95% bootstrap interval, validation top-1, and the model chosen on validation (1)
    "top1_lo": "REAL", "top1_hi": "REAL", "val_accuracy": "REAL", "recommended": "INTEGER",
    # since 0.7: retrieval (evaluate.retrieval), on its own row per evaluation: model "retrieval"
    "map_at_r": "REAL", "r_precision": "REAL", "recall_at_1": "REAL", "recall_at_5": "REAL", "recall_at_10": "REAL",
    # after 0.7: the quality findings (quality:): top-1 without the leaked test images, how many were leaked,
    # the training label-issue candidates; a cleaned head's rows left out and its gain over the same head on
    # every row with the paired 95% interval (quality.exclude)
    "quality_key": "TEXT", "top1_without_leaks": "REAL", "leaked_test": "INTEGER", "label_issues": "INTEGER",
    "excluded_rows": "INTEGER", "cleaning_gain": "REAL", "cleaning_gain_lo": "REAL", "cleaning_gain_hi": "REAL",
    # after 0.7: how far to trust the model predict serves, on the test split (tasks/predict/): the conformal
    # sets' target and reached coverage and mean size, the OOD score's AUROC and FPR95 against predict.ood_data
    "predict_key": "TEXT", "coverage_target": "REAL", "coverage": "REAL", "mean_set_size": "REAL",
    "ood_auroc": "REAL", "ood_fpr95": "REAL",
}
TRUST = ("predict_key", "coverage_target", "coverage", "mean_set_size", "ood_auroc", "ood_fpr95")
METRICS = ("top1", "top5", "balanced_accuracy", "macro_f1", "nll", "ece", "map_at_r", "recall_at_1", "recall_at_5",
           "recall_at_10", "top1_without_leaks")
UNIQUE = ("run_key", "model", "shots")  # one row per model of an evaluation


class RegistryError(RuntimeError):
    """The results registry cannot be read; the message names the file."""


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30)
    try:
        cols = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        conn.execute(f"CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, {cols})")
        have = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
        with conn:  # a registry written by an earlier version gets the newer columns (NULL in its rows)
            for name, kind in COLUMNS.items():
                if name not in have:
                    conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'results_model'").fetchone():
            with conn:  # a registry written before rows were keyed may hold duplicates: keep the latest of each
                keyed = "run_key IS NOT NULL"
                conn.execute(f"DELETE FROM results WHERE {keyed} AND id NOT IN "
                             f"(SELECT MAX(id) FROM results WHERE {keyed} GROUP BY {', '.join(UNIQUE)})")
                conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS results_model ON results ({', '.join(UNIQUE)})")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RegistryError(f"{path} is not a readable results registry ({exc})") from exc
    return conn


def registry_path(cache_dir: str | Path) -> Path:
    return CacheLayout(cache_dir).registry()


def append(cache_dir: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Add or replace the rows of one evaluation (an upsert on evaluation key, model and shots)."""
    rows = [{k: row.get(k) for k in COLUMNS} for row in rows]
    path = registry_path(cache_dir)
    try:
        conn = _connect(path)
    except RegistryError as exc:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning("%s; moved it to %s and started a new registry", exc, aside)
        conn = _connect(path)
    updates = ", ".join(f"{k} = excluded.{k}" for k in COLUMNS if k not in UNIQUE)
    with closing(conn), conn:
        conn.executemany(
            f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + k for k in COLUMNS)}) "
            f"ON CONFLICT ({', '.join(UNIQUE)}) DO UPDATE SET {updates}", rows
        )
    return len(rows)


def add_trust(cache_dir: str | Path, run_key: str, model: str, figures: dict[str, Any], shots: str = "all") -> int:
    """Put a predict run's trust figures (:data:`TRUST`) on the registry row of the model it served (the
    evaluation's row for that model and label count); returns how many rows took them (0: the evaluation's rows
    are not in this registry)."""
    values = {k: figures.get(k) for k in TRUST}
    with closing(_connect(registry_path(cache_dir))) as conn, conn:
        done = conn.execute(f"UPDATE results SET {', '.join(f'{k} = :{k}' for k in TRUST)} "
                            "WHERE run_key = :run_key AND model = :model AND shots = :shots",
                            {**values, "run_key": run_key, "model": model, "shots": shots})
    return done.rowcount


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
