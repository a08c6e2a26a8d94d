"""The pipeline flow in Prefect's ephemeral mode, stage by stage, and the CLI around it."""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.pipeline import pipeline_flow
from flows.execution.local import local_run_settings
from helpers import split_plans, task_runs

pytestmark = pytest.mark.slow


def run(cfg):
    with local_run_settings():
        return pipeline_flow(cfg, stop_after="extract").features


def test_flow_extracts_every_split_then_hits_the_cache_and_trusts_the_store(tiny_config):
    cfg = tiny_config()
    first = run(cfg)
    assert sorted(first) == ["test", "train", "val"]
    assert not any(r.cache_hit for r in first.values())
    assert sum(r.rows for r in first.values()) == 18

    second = run(cfg)
    assert all(r.cache_hit and r.forward_batches == 0 for r in second.values())
    assert {s: r.key for s, r in second.items()} == {s: r.key for s, r in first.items()}

    first["val"].path.unlink()  # the store is the source of truth: no stale Prefect hit
    for piece in (cfg.cache_dir / "features" / "pieces").glob("*.h5"):  # val's pieces too, so it computes
        if piece.stem in {p.key for p in split_plans(cfg)["val"].pieces}:
            piece.unlink()
    third = run(cfg)
    assert not third["val"].cache_hit and third["val"].forward_batches > 0
    assert third["val"].path.exists()
    assert third["train"].cache_hit and third["test"].cache_hit

    removed = CliRunner().invoke(app, ["cache", "rm", third["test"].key[:12], "--cache-dir", str(cfg.cache_dir)])
    assert removed.exit_code == 0, removed.output
    fourth = run(cfg)  # `cache rm` too: no stale Prefect hit
    assert not fourth["test"].cache_hit and fourth["train"].cache_hit


def test_flow_fails_on_bad_data_naming_the_problem(tiny_config, tmp_path):
    cfg = tiny_config(data={"root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="nowhere is not a readable folder"):
        run(cfg)


def test_cli_extract_and_its_errors(tiny_config, tmp_path):
    cfg = tiny_config()
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: cli\ndata: {{source: imagefolder, root: {cfg.data.root}}}\n"
        "backbone: {name: resnet18, weights: none, preprocess: {resize: 32, crop: 32}}\n"
        "extract: {batch_size: 8, num_workers: 0}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(path), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "computed" in result.output and "train" in result.output
    assert len(list((tmp_path / "c" / "features").glob("*.h5"))) == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nextract: {dtype: float64}\n")
    result = runner.invoke(app, ["extract", str(bad)])
    assert result.exit_code == 2
    assert "extract.dtype: Input should be 'float16' or 'float32'" in result.output

    result = runner.invoke(app, ["extract", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.output


def test_every_command_has_help():
    runner = CliRunner()
    for args in (["--help"], ["extract", "--help"], ["heads", "--help"], ["finetune", "--help"], ["demo", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_transient_failure_is_retried_and_resumes(tiny_config, monkeypatch):
    monkeypatch.setenv("TRANSFERPIPE_FAULTS", "extract.batch:2:raise")  # one failure, in the first split
    cfg = tiny_config(retries=2, retry_delay_s=0)
    with local_run_settings():
        state = pipeline_flow(cfg, stop_after="extract", return_state=True)
    assert state.is_completed()
    runs = task_runs(state)
    assert runs["extract-resnet18-train"].run_count == 2
    results = state.result().features
    assert results["train"].forward_batches == 2  # batch 1 was flushed before the fault: 3 - 1
    assert runs["extract-resnet18-val"].run_count == 1


def test_bad_input_is_not_retried(tiny_config):
    cfg = tiny_config(retries=3, retry_delay_s=0)
    root = cfg.data.root
    (root / "class1" / "000.png").write_bytes(b"")
    with local_run_settings():
        state = pipeline_flow(cfg, stop_after="extract", return_state=True)
    assert state.is_failed()
    deadline = time.monotonic() + 300  # the API records the failure from an event, possibly after the flow returned
    while not (failed := [run for run in task_runs(state).values() if run.state.is_failed()]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(failed) == 1 and failed[0].run_count == 1
    with pytest.raises(ValueError, match="cannot be decoded: class1/000.png"):
        state.result()


def test_one_failed_run_names_the_undecodable_images_of_every_split(tiny_config):
    """The hash split puts three bad files in three splits: the error names all of them, not the first split's."""
    from tasks.data.manifest import build_manifest

    cfg = tiny_config()
    manifest = build_manifest(cfg.data, cfg.cache_dir)
    bad = {split: manifest.splits[split][0][0] for split in ("train", "val", "test")}
    for item in bad.values():
        (cfg.data.root / item).write_bytes(b"not an image")
    with local_run_settings():
        state = pipeline_flow(cfg, stop_after="extract", return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"stages extract-\S+-train, extract-\S+-val, extract-\S+-test failed: 3 "
                                         r"image\(s\) in the train split .* and the val split .* and the test split") as err:
        state.result()
    assert all(item in str(err.value) for item in bad.values())


def heads_flow(cfg):
    return pipeline_flow(cfg, stop_after="heads").heads


def test_heads_stage_trains_each_head_once_and_only_the_changed_one_again(tiny_config):
    heads = [{"kind": "logistic", "C": [0.1, 1.0], "shots": [1, "all"], "seeds": 2}, {"kind": "knn", "k": [1, 3]}]
    cfg = tiny_config(heads=heads)
    with local_run_settings():
        first = {r.name: r for r in heads_flow(cfg)}
        assert first["logistic"].fits == 3 and first["knn"].fits == 1
        second = {r.name: r for r in heads_flow(cfg)}
        assert all(r.cache_hit and r.fits == 0 for r in second.values())
        changed = tiny_config(heads=[heads[0], {"kind": "knn", "k": [1, 3, 5]}])
        third = {r.name: r for r in heads_flow(changed)}
    assert third["logistic"].cache_hit and not third["knn"].cache_hit and third["knn"].fits == 1


def test_heads_stage_without_heads_says_so(tiny_config):
    with pytest.raises(ValueError, match="has no heads: add a heads: list"), local_run_settings():
        heads_flow(tiny_config())


def test_finetune_stage_runs_lp_ft_then_is_a_cache_hit(tiny_config):
    cfg = tiny_config(
        heads=[{"kind": "logistic", "C": [0.1, 1.0]}],
        finetune={"enabled": True, "epochs": 2, "batch_size": 4, "num_workers": 0, "augment": "none"},
    )
    with local_run_settings():
        first = pipeline_flow(cfg, stop_after="finetune").finetune
        second = pipeline_flow(cfg, stop_after="finetune").finetune
    assert not first.cache_hit and first.epochs_run == 2 and first.best_checkpoint.exists()
    assert second.cache_hit and second.epochs_run == 0 and second.best_checkpoint == first.best_checkpoint


def test_a_fine_tuning_search_keeps_the_run_best_on_validation_and_reports_what_it_tried(tiny_config):
    """Two candidates, one with a learning rate that wrecks the weights: the pipeline evaluates the run best on
    validation, its report lists both, and a search that adds a value reruns only the new candidate."""
    ft = {"enabled": True, "epochs": 2, "batch_size": 4, "num_workers": 0, "augment": "none", "warmup_epochs": 0,
          "search": {"lr_head": [1e-3, 50.0]}}
    cfg = tiny_config(heads=[{"kind": "logistic", "C": [0.1, 1.0]}], finetune=ft)
    with local_run_settings():
        first = pipeline_flow(cfg)
        grown = pipeline_flow(tiny_config(heads=[{"kind": "logistic", "C": [0.1, 1.0]}],
                                          finetune={**ft, "search": {"lr_head": [1e-3, 50.0, 1e-2]}}))
    report = json.loads((first.report.parent / "report.json").read_text())
    tried = report["finetune_search"]
    assert [t["settings"] for t in tried] == ["lr_head=0.001", "lr_head=50.0"]
    best = max(tried, key=lambda t: t["best_val_accuracy"])
    assert [t["chosen"] for t in tried].count(True) == 1 and best["chosen"]
    assert report["keys"]["finetune"] == best["key"] and first.finetune.key == best["key"]
    assert "## Fine-tuning search" in first.report.read_text()
    text = first.report.read_text()
    assert ("Fine-tuning did not beat the probe" in text) == (first.finetune.best_epoch == 0)
    finetuned = next(m for m in first.models if m.name == "finetuned")
    assert finetuned.val_accuracy == best["best_val_accuracy"]
    grown_tried = json.loads((grown.report.parent / "report.json").read_text())["finetune_search"]
    assert [t["settings"] for t in grown_tried][:2] == ["lr_head=0.001", "lr_head=50.0"] and len(grown_tried) == 3
    assert not grown.stages["finetune"]["cache_hit"]  # the new candidate trained ...
    for old, new in zip(tried, grown_tried):  # ... and the two before it were reused, not trained again
        assert new["key"] == old["key"] and new["train_seconds"] == old["train_seconds"]


def test_pipeline_end_to_end_then_all_hits_then_only_the_changed_head(tiny_config):
    from storage.results import query

    heads = [{"kind": "logistic", "C": [0.1, 1.0], "shots": [1, "all"], "seeds": 2}, {"kind": "ridge"}]
    cfg = tiny_config(heads=heads, finetune={"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0})
    with local_run_settings():
        first = pipeline_flow(cfg)
        written = first.report.stat().st_mtime_ns
        second = pipeline_flow(cfg)
        changed = pipeline_flow(tiny_config(heads=[heads[0], {"kind": "ridge", "alpha": [1.0]}],
                                            finetune={"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0}))
    assert {(m.name, str(m.shot)) for m in first.models} == {("logistic", "1"), ("logistic", "all"), ("ridge", "all"), ("finetuned", "all")}
    assert first.report.exists() and (first.report.parent / "report.json").exists()
    assert not any(s["cache_hit"] for s in first.stages.values())
    assert all(s["cache_hit"] for s in second.stages.values()) and second.report == first.report
    assert second.report.stat().st_mtime_ns == written  # a cache hit re-renders nothing
    assert changed.stages["extract"]["cache_hit"] and changed.stages["finetune"]["cache_hit"]
    assert not changed.stages["heads"]["cache_hit"] and not changed.stages["evaluate"]["cache_hit"]
    rows = query(cfg.cache_dir, experiment="tiny")
    assert len(rows) == 8  # 4 models, evaluated twice (the rerun was a cache hit and added none)


def test_a_failed_stage_is_named_and_the_rerun_recomputes_only_it_and_what_follows(tiny_config, monkeypatch):
    """A real failure (injected through the documented fault hook) in fine-tuning; then a clean rerun."""
    import json

    from flows.execution.stage_tasks import StageFailed
    from storage.faults import InjectedFault
    from tasks.finetune.plan import FinetuneResult

    cfg = tiny_config(heads=[{"kind": "logistic", "C": [1.0]}],
                      finetune={"enabled": True, "epochs": 2, "batch_size": 4, "num_workers": 0})
    monkeypatch.setenv("TRANSFERPIPE_FAULTS", "finetune.epoch:2:raise")  # right after epoch 1 is checkpointed (epoch 0, the probe, is the first)
    with local_run_settings():
        state = pipeline_flow(cfg, return_state=True)
    assert state.is_failed() and "stage finetune-resnet18 failed: injected fault at finetune.epoch" in state.message
    with pytest.raises(StageFailed, match="stage finetune-resnet18 failed") as failed:
        state.result()
    assert isinstance(failed.value.__cause__, InjectedFault)
    monkeypatch.delenv("TRANSFERPIPE_FAULTS")
    with local_run_settings():
        rerun = pipeline_flow(cfg)
    assert rerun.stages["extract"]["cache_hit"] and rerun.stages["heads"]["cache_hit"]
    assert not rerun.stages["finetune"]["cache_hit"] and not rerun.stages["evaluate"]["cache_hit"]
    # fine-tuning resumed after epoch 1 instead of restarting
    saved = FinetuneResult.model_validate({**json.loads(next(cfg.cache_dir.glob("finetune/*/result.json")).read_text()),
                                           "cache_hit": False, "seconds": 0})
    assert saved.resumed_from == 1 and saved.epochs_run == 1


def test_random_transient_faults_are_retried_to_the_same_results_as_a_clean_run(tiny_config, tmp_path, monkeypatch):
    from storage import faults
    from storage.features import FeatureStore

    heads = [{"kind": "logistic", "C": [0.1, 1.0], "shots": [1, "all"], "seeds": 2}, {"kind": "knn", "k": [1, 3]}]
    tune = {"enabled": True, "epochs": 2, "batch_size": 4, "num_workers": 0}
    clean_cfg = tiny_config(heads=heads, finetune=tune)
    faulty_cfg = tiny_config(heads=heads, finetune=tune, cache_dir=str(tmp_path / "faulty"), retries=10,
                             retry_delay_s=0)
    with local_run_settings():
        clean = pipeline_flow(clean_cfg)
    monkeypatch.setenv(faults.ENV, "extract.batch:p=0.3,heads.fit:p=0.3,finetune.batch:p=0.2")
    monkeypatch.setenv(faults.SEED_ENV, "7")
    monkeypatch.setattr(faults, "fired", {})
    with local_run_settings():
        faulty = pipeline_flow(faulty_cfg)
    assert sum(faults.fired.values()) >= 3 and len(faults.fired) == 3, faults.fired  # every stage was hit

    def outcome(result):
        return [(m.name, str(m.shot), m.metrics) for m in result.models]

    assert outcome(faulty) == outcome(clean)  # every metric of every model, exactly
    for plan in split_plans(clean_cfg).values():
        clean_set, faulty_set = (FeatureStore(c.cache_dir).read(plan.key) for c in (clean_cfg, faulty_cfg))
        assert (clean_set.features["penultimate"] == faulty_set.features["penultimate"]).all()


@pytest.mark.slow
def test_a_prefect_record_naming_a_result_class_that_moved_is_run_past_not_a_crash(tiny_config):
    """Prefect's JSON records name the result's class (``tasks.extract.ExtractResult`` before tasks/ became
    packages); a record whose class no longer imports read back as a dict, and the run died on
    ``'dict' object has no attribute 'cached'``. Now the stage runs past it, reusing its store."""
    from storage.keys import fingerprint
    from storage.layout import CacheLayout

    cfg = tiny_config(heads=[{"kind": "knn", "k": [1]}])
    with local_run_settings():
        first = pipeline_flow(cfg, stop_after="heads")
        storage = CacheLayout(cfg.cache_dir).prefect_records()  # the stages' records live beside their cache
        moved, mine = 0, fingerprint(str(cfg.cache_dir.resolve()))[:16]  # this cache's records (their key's end)
        for record in storage.glob(f"*-{mine}"):
            stored = json.loads(record.read_text())
            result = stored.get("result")
            if isinstance(result, str) and '"__class__": "tasks.' in result:
                stored["result"] = result.replace('"__class__": "tasks.', '"__class__": "tasks.gone_since.')
                record.write_text(json.dumps(stored))
                moved += 1
        assert moved >= 4  # three splits and the head
        again = pipeline_flow(cfg, stop_after="heads")
    assert {s: r.key for s, r in again.features.items()} == {s: r.key for s, r in first.features.items()}
    assert all(r.cache_hit for r in again.features.values()) and all(h.cache_hit for h in again.heads)
    assert [rec.key for h in again.heads for rec in h.records] == [rec.key for h in first.heads for rec in h.records]


@pytest.mark.slow
def test_a_hit_recorded_under_one_prefect_home_is_a_hit_under_another(tiny_config, tmp_path):
    """Prefect's result records live in the cache folder: two machines (here two Prefect homes, each its
    own ephemeral server and database) sharing a cache see each other's hits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import write_config

    cfg = tiny_config(heads=[{"kind": "knn", "k": [1]}])
    config = write_config(cfg, tmp_path / "tiny.yaml")

    def run(home: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(tmp_path / home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], env=env, text=True,
                              capture_output=True, timeout=1800, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    first, second = run("home-a"), run("home-b")
    stages = ("extract-resnet18-train", "head-knn-penultimate", "evaluate-tiny")
    assert not any(f"'{s}' - Finished in state Cached" in first for s in stages)
    assert all(f"'{s}' - Finished in state Cached" in second for s in stages), second[-4000:]
    assert any((cfg.cache_dir / "prefect-records").iterdir())
    assert not (tmp_path / "home-a" / "storage").exists() or not any((tmp_path / "home-a" / "storage").iterdir())
