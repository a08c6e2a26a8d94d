"""A feature cache you can trust: kill -9 and resume, integrity, one writer per key, full disks.

The in-process integrity checks (a truncated file, an inherited lock) run in the fast loop (``-m "not slow"``):
they go through storage/features.py, h5file.py, writer.py and piece_join.py in about a second each.

Every crash here is real: a subprocess killed with SIGKILL at a chosen point
(``TRANSFERPIPE_FAULTS``, storage/faults.py) or stopped by a file-size limit.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from storage.features import CorruptFeatureFile, FeatureStore
from tasks.extract.plan import SplitPlan
from tasks.extract.stage import extract_split
from helpers import flip_a_feature_byte, make_imagefolder, split_plans

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import resource, signal, sys
from tasks.extract import SplitPlan, extract_split
plan = SplitPlan.model_validate_json(open(sys.argv[1]).read())
if len(sys.argv) > 2:  # a disk that fills up: writes past this size fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
print(extract_split(plan).model_dump_json())
"""


def child(plan: SplitPlan, tmp_path: Path, faults: str = "", fsize: int | None = None) -> subprocess.Popen:
    spec = tmp_path / f"plan-{time.monotonic_ns()}.json"
    spec.write_text(plan.model_dump_json())
    import torch

    # the same torch threads as this process: on a batch smaller than the thread count the sums' order (so a
    # float16's last bit) depends on it, and a Dask test earlier may have left OMP_NUM_THREADS=1 behind
    env = {**os.environ, "TRANSFERPIPE_FAULTS": faults, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [sys.executable, "-c", CHILD, str(spec)] + ([str(fsize)] if fsize else [])
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def experiment(tmp_path, tiny_config):
    """29 training images in 8 batches of 4 (and 7 test images); one config per cache dir, same keys."""
    root = make_imagefolder(tmp_path / "big", n_per_class=12)

    def plan(cache: str, split: str = "train", **data) -> SplitPlan:
        cfg = tiny_config(
            data={"root": str(root), "val_fraction": 0, "test_fraction": 0.25, **data}, cache_dir=str(tmp_path / cache)
        )
        return split_plans(cfg)[split]

    return plan


def partial(plan: SplitPlan) -> Path:
    """The partial file of the split's one piece (29 images: one piece at the default piece size)."""
    (piece,) = plan.pieces
    return FeatureStore(plan.cache_dir).pieces().partial_path(piece.key)


def contents(path: Path) -> dict:
    with h5py.File(path) as fh:
        return {
            "features": fh["features/penultimate"][()], "labels": fh["labels"][()],
            "paths": list(fh["paths"].asstr()[()]), "checksums": fh.attrs["checksums"],
            "skipped": fh.attrs["skipped"],
        }


def assert_identical(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert ca["features"].tobytes() == cb["features"].tobytes()
    assert ca["labels"].tolist() == cb["labels"].tolist() and ca["paths"] == cb["paths"]
    assert ca["checksums"] == cb["checksums"] and ca["skipped"] == cb["skipped"]


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
@pytest.mark.parametrize(
    ("faults", "batches_left"),
    [
        ("extract.batch:4:kill", (5, 6)),  # between batches: 2-3 flushed, the rest recomputed
        ("store.append:6:kill", (3, 3)),  # mid-flush: rows of batch 6 written, rows_done not updated
        ("store.complete:1:kill", (0, 0)),  # everything flushed, checksums written, complete not set
    ],
)
def test_kill_9_then_rerun_resumes_to_identical_bytes(experiment, tmp_path, faults, batches_left):
    reference = extract_split(experiment("reference"))
    plan = experiment("crashy")
    proc = child(plan, tmp_path, faults)
    proc.wait(timeout=1800)
    assert proc.returncode == -9, proc.stderr.read()
    store = FeatureStore(plan.cache_dir)
    assert partial(plan).exists() and store.lookup(plan.key) is None
    for lock in (store.lock(plan.key, timeout=0), store.pieces().lock(plan.pieces[0].key, timeout=0)):
        lock.acquire()  # the dead writer's locks died with it
        lock.release()

    resumed = extract_split(plan)
    assert not resumed.cache_hit
    assert batches_left[0] <= resumed.forward_batches <= batches_left[1]
    assert_identical(resumed.path, reference.path)
    assert store.verify(plan.key) == []
    assert not partial(plan).exists()


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_resume_with_skipped_images_records_them_once(experiment, tmp_path):
    from tasks.data.manifest import Manifest

    train = Manifest.load(experiment("reference").manifest).splits["train"]
    for rel, _ in (train[1], train[20]):
        (tmp_path / "big" / rel).write_bytes(b"not a png")
    reference = extract_split(experiment("reference", on_bad_image="skip"))
    plan = experiment("crashy", on_bad_image="skip")
    proc = child(plan, tmp_path, "store.complete:1:kill")
    assert proc.wait(timeout=1800) == -9
    resumed = extract_split(plan)
    assert resumed.skipped == 2 and resumed.rows == reference.rows
    assert len(json.loads(contents(resumed.path)["skipped"])) == 2
    assert_identical(resumed.path, reference.path)


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_torn_partial_is_set_aside_never_deleted_and_extraction_restarts(experiment):
    reference = extract_split(experiment("reference"))
    plan = experiment("torn")
    store = FeatureStore(plan.cache_dir)
    partial(plan).parent.mkdir(parents=True, exist_ok=True)
    partial(plan).write_bytes(b"\x89HDF\r\n garbage from a torn write")
    result = extract_split(plan)
    assert result.forward_batches == 8
    assert_identical(result.path, reference.path)
    kept = list((store.pieces().root / "quarantine").glob(f"{plan.pieces[0].key}.h5.partial.torn-*"))
    assert len(kept) == 1 and kept[0].read_bytes().endswith(b"torn write")


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_second_run_with_the_same_key_waits_then_reuses(experiment, tmp_path, caplog):
    plan = experiment("shared")
    first = child(plan, tmp_path, "extract.batch:2:delay=4")  # holds the lock for 4 s mid-run
    deadline = time.monotonic() + 1800  # a hang guard: the wait ends when the file appears
    while not partial(plan).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with caplog.at_level(logging.INFO, logger="transferpipe"):
        second = extract_split(plan)
    assert first.wait(timeout=1800) == 0, first.stderr.read()
    assert "another run is extracting" in caplog.text
    assert second.cache_hit and second.forward_batches == 0
    assert json.loads(first.stdout.read())["forward_batches"] == 8


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_different_keys_proceed_in_parallel(experiment, tmp_path):
    slow = child(experiment("parallel"), tmp_path, "extract.batch:1:delay=20")
    other = experiment("parallel", split="test")
    store = FeatureStore(other.cache_dir)
    deadline = time.monotonic() + 1800  # a hang guard: the wait ends when the file appears
    while not list(store.pieces().root.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    result = extract_split(other)
    still_running = slow.poll() is None
    slow.kill()
    slow.wait()
    assert still_running and not result.cache_hit and result.rows == 7


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_full_disk_fails_clearly_keeps_the_partial_and_touches_nothing_complete(experiment, tmp_path, tiny_disk):
    reference = extract_split(experiment("reference"))
    done = extract_split(experiment("disk/cache", split="test"))
    before = (done.path.stat().st_mtime_ns, contents(done.path)["checksums"])
    plan = experiment("disk/cache")
    proc = child(plan, tmp_path, "extract.batch:3:delay=6")  # the disk fills up during batch 3
    store = FeatureStore(plan.cache_dir)
    while not partial(plan).exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(2)  # batches 1-2 (tiny) are flushed by now; batch 3 waits
    filler = tiny_disk / "filler"
    free = os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize
    filler.write_bytes(b"\0" * (free - (1 << 20)))  # someone else's file leaves 1 MiB
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 1, err
    assert "FeatureStoreError: not enough disk space in" in err
    kept = int(re.search(r"is kept at row (\d+) and resumes", err).group(1))
    assert kept in (4, 8)  # mid-run: batch 3 could not be written
    assert store.lookup(plan.key) is None and partial(plan).exists()
    assert (done.path.stat().st_mtime_ns, contents(done.path)["checksums"]) == before
    assert store.verify(done.key) == []
    filler.unlink()
    resumed = extract_split(plan)  # room again: the next run finishes the job
    assert resumed.forward_batches == 8 - kept // 4
    assert_identical(resumed.path, reference.path)


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_a_full_disk_stops_a_checkpoint_before_it_is_written_and_says_so(tiny_config, tiny_disk):
    """torch.save on a full disk said only `unexpected pos …` and left a .tmp of up to 60 MB behind."""
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow

    cfg = tiny_config(cache_dir=str(tiny_disk / "cache"), heads=[{"kind": "logistic", "C": [1.0]}],
                      finetune={"enabled": True, "epochs": 1, "batch_size": 4, "num_workers": 0, "augment": "none"})
    with local_run_settings(), pytest.raises(Exception, match=r"cannot write checkpoint .*/(best|last).pt: not enough "
                                                              r"disk space in .*: [\d.]+ MiB free, [\d.]+ MiB needed"):
        pipeline_flow(cfg)  # features and heads fit in 4 MiB; resnet18's 45 MB checkpoint does not
    assert not list(tiny_disk.rglob("*.tmp"))
    assert list((tiny_disk / "cache" / "features").glob("*.h5"))  # what was computed is kept


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_a_file_size_limit_fails_before_writing_and_exits_without_a_crash(experiment, tmp_path):
    """``ulimit -f`` once made HDF5 fail mid-flush with EFBIG, and the process then segfaulted at exit (h5py #914)."""
    reference = extract_split(experiment("reference"))
    plan = experiment("limited")
    proc = child(plan, tmp_path, fsize=8 << 10)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 1, err  # an error, not 139
    assert "would grow to" in err and "past this process's file size limit of 0.0 MiB (ulimit -f)" in err, err
    assert "nothing was written" in err
    assert FeatureStore(plan.cache_dir).lookup(plan.key) is None
    assert_identical(extract_split(plan).path, reference.path)  # without the limit, the next run does the job


@pytest.mark.slow  # a subprocess killed, a full disk, or a second run: seconds each
def test_bit_flip_is_caught_on_read_quarantined_and_recomputed(experiment):
    plan = experiment("flip")
    first = extract_split(plan)
    good = contents(first.path)["features"].copy()
    flip_a_feature_byte(first.path)
    store = FeatureStore(plan.cache_dir)
    piece = store.pieces().path(plan.pieces[0].key)
    assert store.verify(plan.key) == [f"{first.path}: features/penultimate checksum mismatch",
                                      f"{piece}: features/penultimate checksum mismatch"]  # traced to its piece
    assert not piece.exists()  # set aside: the next extraction recomputes it
    with pytest.raises(CorruptFeatureFile, match=f"piece file\\(s\\) pieces/{piece.name} of features/penultimate are "
                                                 "missing; it was quarantined"):
        store.read(plan.key)
    assert not first.path.exists() and list((store.root / "quarantine").glob(f"{plan.key}.h5.corrupt-*"))
    again = extract_split(plan)
    assert not again.cache_hit
    assert np.array_equal(store.read(plan.key).features["penultimate"], good)


def test_truncated_complete_file_is_never_served(experiment):
    plan = experiment("trunc")
    first = extract_split(plan)
    data = first.path.read_bytes()
    first.path.write_bytes(data[: len(data) // 2])
    store = FeatureStore(plan.cache_dir)
    assert store.verify(plan.key)[0].startswith(str(first.path))
    again = extract_split(plan)  # lookup's cheap checks quarantine it; the stage joins its pieces again
    assert not again.cache_hit and again.forward_batches == 0 and store.verify(plan.key) == []


def test_a_file_lock_inherited_elsewhere_does_not_make_a_sound_file_unreadable(experiment):
    """A DataLoader worker forked while a writer had the file open keeps HDF5's flock on it."""
    import fcntl

    plan = experiment("locked")
    result = extract_split(plan)
    store = FeatureStore(plan.cache_dir)
    fd = os.open(result.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what the forked child holds
        assert store.lookup(plan.key) == result.path
        assert len(store.read(plan.key).labels) == result.rows
    finally:
        os.close(fd)
    assert not (store.root / "quarantine").exists()
