"""One experiment graph: ``plan`` announces exactly the artifacts ``run`` and ``select`` then write."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from flows.planning.explain import explain
from flows.planning.nodes import nodes
from tasks.stages import EVALUATE, EXTRACT, FINETUNE, HEADS, QUALITY, SCORE, STAGES
from flows.pipeline import pipeline_flow
from flows.execution.local import local_run_settings
from flows.experiments.selection import select_flow
from storage.keys import short
from storage.records import STAGE_FOLDERS

REPO = Path(__file__).resolve().parents[1]
HEADS_CFG = [{"kind": "logistic", "C": [0.1, 1.0], "shots": [1, "all"], "seeds": 2}, {"kind": "knn", "k": [1, 3]}]
EVERY_STAGE = {
    "heads": HEADS_CFG,
    "finetune": {"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0, "augment": "none",
                 "early_stopping": None},
    "select": {"candidates": [
        {"label": "a", "backbone": {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}}},
        {"label": "b", "backbone": {"name": "resnet18", "weights": "none", "init_seed": 1,
                                    "preprocess": {"resize": 32, "crop": 32}}},
    ]},
    "export": {"format": "npy"},
    "index": {"split": "train", "kind": "flat"},
    "quality": {"neighbours": 3, "folds": 2},
}


def written(cache: Path) -> dict[str, set[str]]:
    """The keys of every artifact in a cache, by the stage that writes it (reports are named by short key; a
    stage whose files class declares its folder, by the folders in it; the new images' features by the
    predictions that read them)."""
    predicted = {json.loads(p.read_text())["data"]: p.parent.name for p in (cache / "predictions").glob("*/spec.json")}
    found = {
        "extract": {p.name.split(".")[0] for p in (cache / "features").glob("*.h5")} - set(predicted),
        "heads": {p.name for p in (cache / "heads").iterdir() if not p.name.startswith(".")},
        "finetune": {p.name for p in (cache / "finetune").iterdir()},
        "evaluate": {p.name for p in (cache / "runs").glob("*/*") if p.is_dir()},
        "score": {p.stem for p in (cache / "scores").glob("*.json")},
    }
    for kind, files in STAGE_FOLDERS.items():
        folder = cache / files.cache_folder
        found[kind] = {p.name for p in folder.iterdir() if p.name != "quarantine"} if folder.is_dir() else set()
    found["predict"] |= set(predicted)
    return found


@pytest.mark.slow
def test_plan_announces_exactly_what_run_and_select_write(tiny_config, imagefolder):
    """Every stage of the graph (tasks/stages.py: STAGES), planned on an empty cache, then run."""
    pytest.importorskip("faiss")
    cfg = tiny_config(**EVERY_STAGE, predict={"data": {"source": "files", "root": str(imagefolder)}, "coverage": 0.5,
                                              "model": "knn"}, export_model={"model": "logistic", "formats": ["pt2"]})
    planned = explain(cfg)
    assert planned and not any(step.cached for step in planned)
    assert all(step.key for step in planned), [s for s in planned if not s.key]  # every key known on an empty cache
    announced: dict[str, set[str]] = {}
    for step in planned:
        announced.setdefault(step.stage, set()).add(short(step.key) if step.stage == "evaluate" else step.key)

    with local_run_settings():
        pipeline_flow(cfg)
        select_flow(cfg)
        pipeline_flow(cfg, stop_after="export")
        pipeline_flow(cfg, stop_after="index")
        pipeline_flow(cfg, stop_after="export-model")

    assert set(written(cfg.cache_dir)) == {node.name for node in STAGES}, "a stage this test does not cover"
    assert written(cfg.cache_dir) == announced
    assert all(step.cached for step in explain(cfg))


def test_each_goal_runs_its_stages_in_order(tiny_config):
    full = tiny_config(**EVERY_STAGE)
    assert nodes(full) == [EXTRACT, QUALITY, HEADS, FINETUNE, EVALUATE]
    assert nodes(full, "heads") == [EXTRACT, HEADS]
    assert nodes(full, "score") == [EXTRACT, HEADS, SCORE]
    bare = tiny_config()  # no heads, no fine-tuning: each runs only when asked for
    assert nodes(bare) == [EXTRACT, EVALUATE]
    assert nodes(bare, "heads") == [EXTRACT, HEADS] and nodes(bare, "finetune") == [EXTRACT, FINETUNE]


def test_plan_says_where_a_run_would_stop(tiny_config):
    steps = explain(tiny_config(heads=HEADS_CFG, data={"test_fraction": 0}))
    assert steps[-1].stage == "check" and steps[-1].key is None
    assert steps[-1].why == ["a run stops here: the pipeline evaluates on a test split: set data.test_fraction > 0 "
                             "or add a test folder"]


def test_a_run_that_cannot_evaluate_fails_before_extracting(tiny_config):
    cfg = tiny_config(heads=HEADS_CFG, data={"test_fraction": 0})
    with pytest.raises(ValueError, match="evaluates on a test split"), local_run_settings():
        pipeline_flow(cfg)
    assert not list((cfg.cache_dir / "features").glob("*.h5"))


def test_only_the_graph_orders_stages():
    """Stage tasks are called by flows/planning/graph.py alone (scale_out runs the shards of one extraction)."""
    callers = set()
    for path in (REPO / "flows").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "run_stage", "submit_stage"):
                callers.add(path.name)
    assert callers <= {"graph.py", "stage_tasks.py", "scale_out.py"}, callers
