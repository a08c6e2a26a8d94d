"""``transferpipe cache ls|verify|rm|gc`` on real feature files."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.faults import ENV, InjectedFault
from storage.features import FeatureStore
from tasks.extract.stage import extract_split
from helpers import flip_a_feature_byte, split_plans

runner = CliRunner()


@pytest.fixture
def cache(tiny_config, monkeypatch):
    """A cache with two complete files (train, test) and val's extraction interrupted (a partial piece)."""
    cfg = tiny_config()
    plans = split_plans(cfg)
    done = {s: extract_split(plans[s]) for s in ("train", "test")}
    monkeypatch.setenv(ENV, "extract.batch:1:raise")
    with pytest.raises(InjectedFault):
        extract_split(plans["val"])
    monkeypatch.delenv(ENV)
    return cfg.cache_dir, plans, done


def cli(*args: str):
    result = runner.invoke(app, ["cache", *args])
    result.text = " ".join(result.output.split())  # rich wraps long lines
    return result


def test_ls_shows_complete_and_partial_files(cache):
    cache_dir, plans, _ = cache
    result = runner.invoke(app, ["cache", "ls", "--wide", "--cache-dir", str(cache_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 feature file(s)" in result.output and "1 partial piece(s)" in " ".join(result.output.split())
    for split, state in (("train", "complete"), ("test", "complete")):
        line = next(ln for ln in result.output.splitlines() if plans[split].key[:12] in ln)
        assert split in line and state in line and "resnet18" in line and "none(seed=0)" in line
    assert "12 x 512" in result.output and "images" in result.output


def test_verify_reports_and_quarantines_a_corrupt_file(cache):
    cache_dir, plans, done = cache
    ok = cli("verify", "--cache-dir", str(cache_dir))
    assert ok.exit_code == 0 and "2 checked, 0 corrupt" in ok.text
    flip_a_feature_byte(done["train"].path)
    bad = cli("verify", plans["train"].key[:8], "--cache-dir", str(cache_dir))
    assert bad.exit_code == 1
    text = bad.output.replace("\n", "")
    assert plans["train"].key[:12] in text and "CORRUPT" in text and "checksum mismatch" in text
    assert not done["train"].path.exists() and "pieces/" in text  # the bad piece is named and set aside
    again = extract_split(plans["train"])  # the next run recomputes that piece instead of using it
    assert not again.cache_hit and again.forward_batches == 3
    assert cli("verify", "nope", "--cache-dir", str(cache_dir)).exit_code == 2


def test_rm_dry_run_then_rm_then_recompute(cache):
    cache_dir, plans, done = cache
    key = plans["test"].key
    dry = cli("rm", key[:10], "--dry-run", "--cache-dir", str(cache_dir))
    assert dry.exit_code == 0 and "would remove" in dry.output and done["test"].path.exists()
    gone = cli("rm", key[:10], "--cache-dir", str(cache_dir))
    assert gone.exit_code == 0, gone.output
    assert not done["test"].path.exists()
    again = extract_split(plans["test"])  # joined again from its pieces, which stay (other splits may hold them)
    assert not again.cache_hit and again.forward_batches == 0
    assert cli("rm", "ffffffff", "--cache-dir", str(cache_dir)).exit_code == 2


def test_rm_refuses_a_key_another_process_is_writing(cache):
    cache_dir, plans, _ = cache
    lock = FeatureStore(cache_dir).lock(plans["train"].key).lock_file
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from filelock import FileLock; l = FileLock({lock!r}); l.acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    try:
        result = cli("rm", plans["train"].key, "--cache-dir", str(cache_dir))
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and "being written by another run" in result.output


def test_gc_removes_stale_partials_and_optionally_unused_files(cache):
    cache_dir, plans, done = cache
    store = FeatureStore(cache_dir)
    (partial,) = store.pieces().root.glob("*.h5.partial")
    fresh = cli("gc", "--cache-dir", str(cache_dir))
    assert fresh.exit_code == 0 and "0 file(s) removed" in fresh.output and partial.exists()
    old = time.time() - 2 * 86400
    os.utime(partial, (old, old))
    dry = cli("gc", "--dry-run", "--cache-dir", str(cache_dir))
    assert "would remove" in dry.output and partial.exists()
    assert "1 file(s) removed" in cli("gc", "--cache-dir", str(cache_dir)).output
    assert not partial.exists() and done["train"].path.exists()
    marker = cache_dir / "features" / f"{plans['train'].key}.used"
    os.utime(marker, (old, old))
    train_pieces = {store.pieces().path(p.key) for p in plans["train"].pieces}
    for piece in train_pieces:
        os.utime(piece, (old, old))
    result = cli("gc", "--unused-days", "1", "--cache-dir", str(cache_dir))
    assert result.exit_code == 0 and "unused for 2.0 days" in result.text and "a piece no feature file joins" in result.text
    assert not done["train"].path.exists() and done["test"].path.exists()
    assert not any(p.exists() for p in train_pieces)


def test_every_cache_command_has_help():
    for sub in ("ls", "verify", "rm", "gc"):
        result = cli(sub, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_rm_takes_every_kind_of_key(tmp_path):
    """A head, a fine-tuning run, a report, scores, an export, an index or an embedding map named by an error
    message can be removed by its key; the path it prints is one line however long (a copy-paste works)."""
    import numpy as np

    from storage.head_store import save_head

    tmp_path = tmp_path / ("a-long-cache-folder-name" * 4)

    head = save_head(tmp_path, "a" * 64, {"w": np.ones(2)}, {"kind": "ridge"})
    run = tmp_path / "finetune" / ("b" * 64)
    report = tmp_path / "runs" / "exp" / ("c" * 12)
    scores = tmp_path / "scores" / ("d" * 64 + ".json")
    export, index = tmp_path / "exports" / ("1" * 64), tmp_path / "indexes" / ("2" * 64)
    drawn = tmp_path / "maps" / ("3" * 64 + ".png")
    for folder in (run, report, export, index):
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("{}")
    scores.parent.mkdir()
    scores.write_text("{}")
    drawn.parent.mkdir()
    drawn.write_bytes(b"png")
    runner = CliRunner()
    for prefix, path in (("aaaa", head), ("b" * 64, run), ("c" * 64, report), ("dddd", scores), ("1111", export),
                         ("2222", index), ("3333", drawn)):
        result = runner.invoke(app, ["cache", "rm", prefix, "--cache-dir", str(tmp_path)])
        assert result.exit_code == 0 and f"removed {path}" in result.output, result.output
        assert not path.exists()
    missing = runner.invoke(app, ["cache", "rm", "eeee", "--cache-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "'eeee' matches no cached keys" in missing.output


def test_files_renamed_or_removed_while_listed_are_left_out(cache):
    """Another process ends an extraction (renames .h5.partial to .h5) or gc removes a file while this one
    lists the cache: what vanished between the listing and the reading is left out, not an error (a sweep
    of concurrent experiments failed on this when it explained a feature key)."""
    from storage import inventory

    cache_dir, plans, _ = cache
    store = FeatureStore(cache_dir)
    folder = store.files.folder
    gone = folder / ("f" * 64 + ".h5.partial")
    gone.symlink_to(folder / "renamed-meanwhile.h5.partial")  # listed by glob, absent when read
    (folder / ("e" * 64 + ".h5")).symlink_to(folder / "removed-meanwhile.h5")
    with pytest.raises(FileNotFoundError):
        inventory.info(store, gone)
    keys = {e.key for e in inventory.entries(store)}
    assert keys == {plans["train"].key, plans["test"].key}
    assert inventory.pieces_summary(store)[0] >= 2
    assert inventory.collect(store, partial_older_than_s=0, dry_run=True) is not None
    result = runner.invoke(app, ["cache", "ls", "--wide", "--cache-dir", str(cache_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "2 feature file(s)" in result.output, result.output


def test_ls_reads_at_80_columns_and_gives_the_rest_wide_or_as_json(cache):
    import json

    cache_dir, plans, done = cache
    narrow = runner.invoke(app, ["cache", "ls", "--cache-dir", str(cache_dir)], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    lines = narrow.output.splitlines()
    assert max(map(len, lines)) <= 80, narrow.output
    for split in ("train", "test"):
        row = next(ln for ln in lines if plans[split].key[:12] in ln)  # one line per file, values whole
        assert all(v in row for v in ("resnet18", "images", split, f"{done[split].rows} x 512", "complete")), row
    assert "--wide" in narrow.output and "none(seed=0)" not in narrow.output
    records = json.loads(runner.invoke(app, ["cache", "ls", "-o", "json", "--cache-dir", str(cache_dir)]).output)
    assert sorted(r["key"] for r in records) == sorted(plans[s].key for s in ("train", "test"))
    assert all(r["spec"]["weights"] == "none(seed=0)" and r["complete"] for r in records)
