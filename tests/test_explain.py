"""`transferpipe plan`: what a run would compute and why, against what a real run then does."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.planning.explain import explain
from flows.pipeline import pipeline_flow
from flows.execution.local import local_run_settings
from helpers import write_config

pytestmark = pytest.mark.slow
HEADS = [{"kind": "logistic", "C": [0.1, 1.0], "shots": [1, "all"], "seeds": 2}, {"kind": "knn", "k": [1, 3]}]


def todo(cfg) -> dict[tuple[str, str], list[str]]:
    return {(i.stage, i.what): i.why for i in explain(cfg) if not i.cached}


def test_plan_says_what_will_compute_and_why(tiny_config, tmp_path):
    cfg = tiny_config(heads=HEADS, extract={"piece_size": 2})
    fresh = explain(cfg)
    assert [i.stage for i in fresh].count("heads") == 4 and not any(i.cached for i in fresh)
    assert all(i.why[0] == "never computed" for i in fresh)
    assert all(i.why[1].startswith("pieces: ") for i in fresh if i.stage == "extract")
    with local_run_settings():
        pipeline_flow(cfg)
    assert todo(cfg) == {}  # after a run: everything cached

    changed = tiny_config(heads=[HEADS[0], {"kind": "knn", "k": [1, 3, 5]}], extract={"piece_size": 2})
    assert todo(changed) == {("heads", "knn shot all seed 0"): ["head.k [1,3] → [1,3,5]"],
                             ("evaluate", "tiny"): todo(changed)[("evaluate", "tiny")]}
    assert todo(changed)[("evaluate", "tiny")][0].startswith("models ")

    touched = cfg.data.root / "class1" / "000.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = todo(cfg)
    split = next(what for stage, what in after if stage == "extract")
    data, pieces, piece = after[("extract", split)]
    assert data == "data: 1 item(s) changed (e.g. class1/000.png)"
    assert pieces.startswith("pieces: 1 of ") and " to extract (" in pieces  # the piece holding it, no other
    assert piece.startswith("  piece ") and "class1/000.png" in piece and piece.endswith(": 1 item(s) changed")
    assert [stage for stage, _ in after].count("extract") == 1  # only the split holding the image

    result = CliRunner().invoke(app, ["plan", str(write_config(cfg, tmp_path / "tiny.yaml"))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "to compute" in result.output and "why: data: 1 item(s) changed" in result.output
