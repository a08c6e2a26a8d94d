"""A cache folder is self-contained: two side by side, one moved or one copied, each serves only itself."""
from __future__ import annotations

import shutil

import pytest

from flows.execution.local import local_run_settings
from flows.pipeline import pipeline_flow

pytestmark = pytest.mark.slow

SETUP = {"heads": [{"kind": "logistic", "C": [1.0]}],
         "finetune": {"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0, "augment": "none",
                      "early_stopping": None}}


def run(tiny_config, cache):
    with local_run_settings():
        return pipeline_flow(tiny_config(**SETUP, cache_dir=str(cache)))


def under(path, folder) -> bool:
    return folder.resolve() in path.resolve().parents


def test_two_caches_side_by_side_then_one_removed(tiny_config, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    run(tiny_config, a)
    run(tiny_config, b)
    again = run(tiny_config, a)
    assert under(again.report, a) and under(again.finetune_checkpoint, a)
    assert all(s["cache_hit"] for s in again.stages.values())
    shutil.rmtree(b)
    assert under(run(tiny_config, a).report, a)


def test_a_moved_and_a_copied_cache_serve_their_own_files(tiny_config, tmp_path):
    first = run(tiny_config, tmp_path / "A")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "A", moved)
    after_move = run(tiny_config, moved)
    assert under(after_move.report, moved) and under(after_move.finetune_checkpoint, moved)
    assert after_move.stages["extract"]["forward_batches"] == 0 and after_move.stages["finetune"]["epochs_run"] == 0
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    shutil.rmtree(moved)  # a copy that still read the original's checkpoint would fail now
    from_copy = run(tiny_config, copy)
    assert under(from_copy.finetune_checkpoint, copy) and from_copy.finetune_checkpoint.is_file()
    assert [m.metrics["top1"] for m in from_copy.models] == [m.metrics["top1"] for m in first.models]
    stored = (copy / "finetune").glob("*/result.json")
    assert not any(str(tmp_path) in p.read_text() for p in stored)  # no absolute path into a cache in its results


@pytest.fixture
def read_only_view(tmp_path):
    """A read-only bind mount of a folder (as a team's shared cache on a read-only disk); skipped where mounting is
    not allowed. Root ignores file modes, so chmod could not test this."""
    import subprocess

    mounts = []

    def view(folder):
        target = tmp_path / f"ro-{len(mounts)}"
        target.mkdir()
        for args in (["--bind", str(folder), str(target)], ["-o", "remount,ro,bind", str(target)]):
            if subprocess.run(["mount", *args], capture_output=True).returncode:
                pytest.skip("cannot bind-mount read-only here (needs root)")
            mounts.append(target) if args[0] == "--bind" else None
        return target

    yield view
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_complete_read_only_cache_is_planned_and_run_and_nothing_is_written(tiny_config, tmp_path, read_only_view):
    from flows.planning.explain import explain

    first = run(tiny_config, tmp_path / "A")
    ro = read_only_view(tmp_path / "A")
    with pytest.raises(OSError, match="Read-only file system"):
        (ro / "probe").write_text("x")
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "A").rglob("*")}
    items = explain(tiny_config(**SETUP, cache_dir=str(ro)))
    assert items and all(i.cached for i in items)
    again = run(tiny_config, ro)
    assert under(again.report, ro) and all(s["cache_hit"] for s in again.stages.values())
    assert [m.metrics["top1"] for m in again.models] == [m.metrics["top1"] for m in first.models]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "A").rglob("*")} == stamp
