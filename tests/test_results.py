"""The results registry (SQLite): rows, sorting, filters, concurrent writers, and the command that prints it."""
from __future__ import annotations

import threading

import pytest

from storage import results as registry


def test_registry_rows_sorting_and_filters(tmp_path):
    registry.append(tmp_path, [
        {"experiment": "a", "model": "m1", "top1": 0.5, "ece": 0.2},
        {"experiment": "a", "model": "m2", "top1": 0.9, "ece": 0.3},
        {"experiment": "b", "model": "m3", "top1": 0.7, "ece": None},
    ])
    assert [r["model"] for r in registry.query(tmp_path)] == ["m2", "m3", "m1"]
    assert [r["model"] for r in registry.query(tmp_path, sort="ece")] == ["m1", "m2", "m3"]  # lower is better; NULL last
    assert [r["model"] for r in registry.query(tmp_path, experiment="a")] == ["m2", "m1"]
    with pytest.raises(ValueError, match="--sort 'speed' is not one of top1"):
        registry.query(tmp_path, sort="speed")
    assert registry.query(tmp_path / "empty") == []


def test_results_command_prints_the_registry(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    registry.append(tmp_path, [
        {"experiment": "exp-a", "model": "logistic", "shots": "all", "backbone": "resnet18", "weights": "none",
         "top1": 0.91, "macro_f1": 0.9, "ece": 0.05, "features_key": "f" * 64, "created_at": "2026-11-22T08:00:00"},
        {"experiment": "exp-b", "model": "knn", "shots": "5", "backbone": "resnet18", "weights": "/w/best.pt",
         "top1": 0.7, "macro_f1": 0.69, "ece": None, "features_key": "f" * 64, "created_at": "2026-11-22T08:01:00"},
    ])
    runner = CliRunner()
    result = runner.invoke(app, ["results", "--wide", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.index("exp-a") < result.output.index("exp-b") and "best.pt" in result.output
    only_b = runner.invoke(app, ["results", "--experiment", "exp-b", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert "exp-a" not in only_b.output and "1 evaluated model(s)" in only_b.output
    bad = runner.invoke(app, ["results", "--sort", "speed", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "is not one of" in bad.output


def test_registry_keeps_every_row_of_concurrent_writers_and_only_known_columns(tmp_path):
    def write(i: int) -> None:
        registry.append(tmp_path, [{"experiment": f"e{i}", "model": f"m{j}", "top1": j / 10, "extra": "dropped"}
                                   for j in range(5)])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = registry.query(tmp_path)
    assert len(rows) == 40 and "extra" not in rows[0]
    assert registry.registry_path(tmp_path) == tmp_path / "results.sqlite"
    assert [r["model"] for r in registry.query(tmp_path, experiment="e[0-1]")][:2] == ["m4", "m4"]  # a glob


ROW = {"experiment": "e", "run_key": "k" * 64, "model": "logistic", "shots": "all", "top1": 0.5}


def test_a_model_of_an_evaluation_is_one_row_however_often_it_is_written(tmp_path):
    """Re-evaluations and identical runs at once upsert: one row per (evaluation key, model, shots)."""
    threads = [threading.Thread(target=registry.append, args=(tmp_path, [{**ROW, "top1": i / 10}])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry.append(tmp_path, [{**ROW, "top1": 0.9}, {**ROW, "shots": "5", "top1": 0.4}])
    rows = registry.query(tmp_path)
    assert [(r["shots"], r["top1"]) for r in rows] == [("all", 0.9), ("5", 0.4)]


def test_a_registry_with_duplicates_from_before_keeps_the_latest_row(tmp_path):
    import sqlite3

    path = registry.registry_path(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE results (id INTEGER PRIMARY KEY, {', '.join(f'{k} {t}' for k, t in registry.COLUMNS.items())})")
    for top1 in (0.1, 0.2):
        conn.execute("INSERT INTO results (experiment, run_key, model, shots, top1) VALUES (?, ?, ?, ?, ?)",
                     ("e", ROW["run_key"], "logistic", "all", top1))
    conn.commit()
    conn.close()
    assert [r["top1"] for r in registry.query(tmp_path)] == [0.2]


def test_a_damaged_registry_is_named_and_set_aside_by_the_next_evaluation(tmp_path):
    path = registry.registry_path(tmp_path)
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(registry.RegistryError, match=f"{path} is not a readable results registry"):
        registry.query(tmp_path)
    registry.append(tmp_path, [ROW])
    assert [r["model"] for r in registry.query(tmp_path)] == ["logistic"]
    assert len(list(tmp_path.glob("results.sqlite.damaged-*"))) == 1


def test_results_reads_at_80_columns_and_gives_the_rest_wide_or_as_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    registry.append(tmp_path, [
        {"experiment": "digits-resnet18-sweep-lr0.01", "model": "logistic", "shots": "all", "backbone": "resnet18",
         "weights": "/w/best.pt", "top1": 0.9612, "top1_lo": 0.9411, "top1_hi": 0.9777, "macro_f1": 0.96,
         "ece": 0.05, "features_key": "f" * 64, "created_at": "2026-11-22T08:00:00"},
        {"experiment": "digits-resnet18-sweep-lr0.01", "model": "prototype", "shots": "10", "backbone": "vit_b_16",
         "weights": "DEFAULT", "top1": 0.7, "top1_lo": 0.65, "top1_hi": 0.75, "macro_f1": 0.69, "ece": None,
         "features_key": "e" * 64, "created_at": "2026-11-22T08:01:00"},
    ])
    runner = CliRunner()
    narrow = runner.invoke(app, ["results", "--cache-dir", str(tmp_path)], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    assert max(map(len, lines)) <= 80, narrow.output
    row = next(ln for ln in lines if "prototype" in ln)  # one line per row: no value broken across lines
    assert all(v in row for v in ("digits-resnet18-sweep-lr0.01", "10", "vit_b_16", "0.700", "0.650–0.750")), row
    assert "--wide" in narrow.output and "best.pt" not in narrow.output
    wide = runner.invoke(app, ["results", "--wide", "--cache-dir", str(tmp_path)], env={"COLUMNS": "80"})
    row = next(ln for ln in wide.output.splitlines() if "logistic" in ln)
    assert all(v in row for v in ("best.pt", "0.960", "0.050", "ffffffffffff", "2026-11-22T08:00")), row
    records = json.loads(runner.invoke(app, ["results", "-o", "json", "--cache-dir", str(tmp_path)]).output)
    assert [r["model"] for r in records] == ["logistic", "prototype"] and records[0]["features_key"] == "f" * 64
    bad = runner.invoke(app, ["results", "-o", "yaml", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--output 'yaml': use table or json" in bad.output


def test_predict_trust_lands_on_the_served_models_row_only(tmp_path):
    """A predict run's coverage, set size and OOD figures go on the row of the model it served (every label), not
    on its few-shot rows or other models; an evaluation this registry lacks takes none."""
    registry.append(tmp_path, [ROW, {**ROW, "shots": "5"}, {**ROW, "model": "knn"}])
    figures = {"predict_key": "p" * 64, "coverage_target": 0.9, "coverage": 0.912, "mean_set_size": 1.3,
               "ood_auroc": 0.97, "ood_fpr95": 0.1, "other": 1}
    assert registry.add_trust(tmp_path, ROW["run_key"], ROW["model"], figures) == 1
    assert registry.add_trust(tmp_path, "nope", ROW["model"], figures) == 0
    rows = {(r["model"], r["shots"]): r for r in registry.query(tmp_path)}
    served = rows[(ROW["model"], "all")]
    assert (served["coverage"], served["mean_set_size"], served["ood_fpr95"]) == (0.912, 1.3, 0.1)
    assert rows[(ROW["model"], "5")]["coverage"] is None and rows[("knn", "all")]["coverage"] is None
    assert registry.add_trust(tmp_path, ROW["run_key"], ROW["model"], {"coverage": 0.5}, shots="5") == 1
    assert {(r["shots"], r["coverage"]) for r in registry.query(tmp_path) if r["model"] == ROW["model"]} \
        == {("all", 0.912), ("5", 0.5)}
