"""Every artifact is checked where it is read: a damaged one is named, set aside and recomputed by the next run."""
from __future__ import annotations

import pytest

from flows.planning.explain import explain
from flows.execution.local import local_run_settings
from flows.pipeline import pipeline_flow
from storage import checkpoints

pytestmark = pytest.mark.slow

SETUP = {"heads": [{"kind": "logistic", "C": [1.0]}],
         "finetune": {"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0, "augment": "none",
                      "early_stopping": None}}


def run(cfg):
    with local_run_settings():
        return pipeline_flow(cfg)


def top1(result) -> list[float]:
    return [m.metrics["top1"] for m in result.models]


@pytest.fixture
def done(tiny_config):
    cfg = tiny_config(**SETUP)
    return cfg, run(cfg)


def test_a_truncated_best_checkpoint_is_seen_by_plan_and_trained_again(done):
    cfg, first = done
    best = first.finetune_checkpoint
    best.write_bytes(best.read_bytes()[:1000])
    todo = {(s.stage, tuple(s.why)) for s in explain(cfg) if not s.cached}
    assert any(stage == "finetune" and "best.pt damaged" in " ".join(why) for stage, why in todo), todo
    again = run(cfg)
    assert again.stages["finetune"]["epochs_run"] == 1 and top1(again) == top1(first)
    assert list((best.parent / "quarantine").glob("best.pt.*"))


def test_zeros_written_into_best_checkpoint_are_caught_on_read(done, tiny_config):
    cfg, first = done
    best = first.finetune_checkpoint
    size = best.stat().st_size
    with open(best, "r+b") as fh:  # same size: only the checksum can tell
        fh.seek(size // 2)
        fh.write(b"\0" * min(4 << 20, size // 2))
    changed = tiny_config(**{**SETUP, "heads": [*SETUP["heads"], {"kind": "knn", "k": [1]}]})  # re-evaluates only
    with pytest.raises(Exception, match="checkpoint .*best.pt is damaged: its sha256 differs"):
        run(changed)
    assert not best.exists() and list((best.parent / "quarantine").glob("best.pt.*"))
    again = run(changed)  # the next run fine-tunes again and evaluates
    assert again.finetune.epochs_run == 1 and again.finetune_checkpoint.is_file()


def test_a_truncated_last_checkpoint_restarts_the_epochs(tiny_config):
    cfg = tiny_config(**{**SETUP, "finetune": {**SETUP["finetune"], "epochs": 2}})
    first = run(cfg)
    files = checkpoints.RunFiles(first.finetune_checkpoint.parent)
    files.result.unlink()  # as if killed after its last epoch was saved
    files.last.write_bytes(files.last.read_bytes()[:500])
    again = run(cfg)
    assert again.finetune.resumed_from == 0 and again.finetune.epochs_run == 2 and top1(again) == top1(first)


def test_a_damaged_head_is_retrained_by_the_next_run(done):
    cfg, first = done
    folder = cfg.cache_dir / "heads" / first.heads[0].records[0].key
    arrays = folder / "arrays.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-8])
    todo = [s for s in explain(cfg) if not s.cached]
    assert todo[0].stage == "heads" and todo[0].why[0].startswith("head damaged (")
    again = run(cfg)
    assert again.stages["heads"]["fits"] == 1 and top1(again) == top1(first)


def test_garbled_result_and_spec_files_are_recomputed_not_fatal(done, tiny_config):
    cfg, first = done
    report = first.report.parent
    (report / "result.json").write_text("{garbled")
    (report / "spec.json").write_text("{garbled")
    assert [s.stage for s in explain(cfg) if not s.cached] == ["evaluate"]
    again = run(cfg)
    assert again.evaluation.cache_hit is False and top1(again) == top1(first)
    changed = tiny_config(**{**SETUP, "heads": [{"kind": "logistic", "C": [1.0, 10.0]}]})
    assert run(changed).models
