"""Inputs a realistic user gets wrong, and caches a team shares: caught before compute, named, never fatal to
what is already computed."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from flows.planning import graph
from helpers import make_imagefolder, split_plans
from storage import atomic, inventory
from storage.features import FeatureStore
from storage.head_store import save_head
from tasks.data.errors import BadImageError
from tasks.data.config import DataConfig
from tasks.data.errors import DataError
from tasks.data.manifest import build_manifest


def nothing_extracted(cfg) -> bool:
    return not list((Path(cfg.cache_dir) / "features").glob("*.h5*"))


# --------------------------------------------------------------------------- config errors before any compute


@pytest.mark.parametrize("over, message", [
    ({"heads": [{"kind": "logistic", "shots": [1, 100]}]}, "heads: logistic asks for 100 labels per class, but class "),
    ({"heads": [{"kind": "logistic"}], "finetune": {"enabled": True, "unfreeze": ["layer99"]}},
     r"finetune.unfreeze: unknown module\(s\) \['layer99'\]; top-level modules of resnet18: .*layer4"),
    ({"heads": [{"kind": "knn", "device": "cuda"}]}, "heads.knn.device 'cuda' is requested but torch sees no CUDA"),
    ({"heads": [{"kind": "logistic"}], "extract": {"device": "cuda:1"}}, "extract.device 'cuda:1' is requested"),
])
def test_config_errors_that_can_be_known_fail_before_anything_computes(tiny_config, over, message):
    import torch

    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = tiny_config(**over)
    with pytest.raises(ValueError, match=message):
        graph.run(cfg)  # fails in its checks, before the first task: no Prefect needed to see it
    assert nothing_extracted(cfg)


def test_plan_shows_where_a_run_would_stop_on_too_many_shots(tiny_config):
    cfg = tiny_config(heads=[{"kind": "logistic", "shots": [1000]}])
    last = graph.walk(cfg)[-1]
    assert last.stage == "check" and last.why[0].startswith("a run stops here: heads: logistic asks for 1000")
    assert nothing_extracted(cfg)


def test_classes_too_small_for_a_split_are_named_before_anything_computes(tiny_config, tmp_path, caplog):
    from helpers import make_image

    cfg = tiny_config(heads=[{"kind": "logistic", "C": [1.0]}])
    make_image(cfg.data.root / "lonely" / "only.png", 0, 7)  # one image: it stays in train
    notes = [s.why[0] for s in graph.walk(cfg) if s.stage == "note"]
    assert notes == [
        "data: 1 class(es) have no val image: 'lonely' (too few images for val_fraction, or an empty val folder); "
        "settings are chosen on val without them",
        "data: 1 class(es) have no test image: 'lonely' (too few images for test_fraction, or an empty test "
        "folder); their test accuracy is left out of the report"]
    assert nothing_extracted(cfg)


# --------------------------------------------------------------------------- odd file names and links


def test_names_that_are_not_utf8_are_named_or_left_out(tmp_path):
    root = make_imagefolder(tmp_path / "images")
    odd = os.path.join(os.fsencode(root / "class0"), b"bad\xff.png")
    with open(odd, "wb") as fh:
        fh.write((root / "class0" / "000.png").read_bytes())
    data = {"source": "imagefolder", "root": str(root), "val_fraction": 0, "test_fraction": 0}
    with pytest.raises(DataError, match=r"1 file name\(s\) under .* are not valid UTF-8: .*class0/bad\\xff\.png"):
        build_manifest(DataConfig(**data), tmp_path / "cache")
    manifest = build_manifest(DataConfig(**data, on_bad_image="skip"), tmp_path / "cache")
    assert len(manifest.splits["train"]) == 18  # the six of each class, the odd one left out


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_a_symlink_loop_is_a_bad_image_not_a_crash(tiny_config, tmp_path):
    from tasks.extract.stage import extract_split

    cfg = tiny_config()
    root = cfg.data.root
    os.symlink("loop-b.png", root / "class1" / "loop-a.png")
    os.symlink("loop-a.png", root / "class1" / "loop-b.png")
    with pytest.raises(BadImageError, match="loop-a.png"):
        for plan in split_plans(cfg).values():
            extract_split(plan)
    skipping = tiny_config(data={"on_bad_image": "skip"})
    skipped = sum(extract_split(p).skipped for p in split_plans(skipping).values())
    assert skipped == 2


def test_gc_removes_links_and_never_follows_them_out_of_the_cache(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / ("a" * 64 + ".h5.partial")
    precious.write_bytes(b"not the cache's")
    old = time.time() - 7200
    os.utime(precious, (old, old))
    store = FeatureStore(tmp_path / "cache")
    (store.files.folder / "shards").mkdir(parents=True)
    os.symlink(outside, store.files.folder / "shards" / ("a" * 64))
    inventory.collect(store, partial_older_than_s=0)
    assert precious.exists()


def test_gc_never_deletes_tmp_files_behind_a_linked_folder(tmp_path):
    """`cache gc` with its defaults deleted *.tmp files outside the cache through symlinked folders."""
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    precious = [outside / "notes.tmp", outside / "deeper" / "work.tmp"]
    for path in precious:
        path.write_bytes(b"someone else's")
    cache = tmp_path / "cache"
    (cache / "scores").mkdir(parents=True)
    os.symlink(outside, cache / "linked")
    os.symlink(outside, cache / "scores" / "linked")
    leftover = cache / "scores" / "half.tmp"
    leftover.write_bytes(b"x")
    removed = {p for p, _ in inventory.collect_temporary(cache, older_than_s=0)}
    assert removed == {leftover} and all(p.exists() for p in precious)


def test_gc_keeps_the_unjoined_pieces_of_a_running_extraction(tmp_path):
    """`gc --partial-hours 0` removed the complete pieces of an extraction that was still running (it failed
    at its join): while a writer holds a lock, no unjoined piece is removed; once none does, they go."""
    import numpy as np

    store = FeatureStore(tmp_path / "cache")
    pieces = store.pieces()
    piece = "b" * 64
    from helpers import synthetic_spec

    pieces.write(piece, [{"penultimate": np.ones((2, 4), np.float16)}], np.zeros(2, np.int64), classes=["a"],
                 dims={"penultimate": 4}, paths=["x", "y"], spec=synthetic_spec("gc", 2, 0))
    running = store.lock("c" * 64)
    running.acquire()  # the split's extraction, still computing its other pieces
    try:
        assert inventory.collect(store, partial_older_than_s=0) == []
        assert pieces.path(piece).exists()
    finally:
        running.release()
    assert [p for p, _ in inventory.collect(store, partial_older_than_s=0)] == [pieces.path(piece)]


def test_gc_collects_what_killed_writes_left(tmp_path):
    cache = tmp_path / "cache"
    leftovers = [cache / "finetune" / "k" / "last.pt.tmp", cache / "scores" / "tmpabc.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    half_head = cache / "heads" / ".0123456789ab-xyz"
    half_head.mkdir(parents=True)
    half_export, half_index = cache / "exports" / ("e" * 64 + ".tmp-12-34"), cache / "indexes" / ("f" * 64 + ".tmp-5-6")
    half_map = cache / "maps" / ("a" * 64 + ".tmp-7.png")
    for folder in (half_export, half_index):
        (folder / "part").mkdir(parents=True)
    half_map.parent.mkdir()
    half_map.write_bytes(b"z")
    kept = cache / "finetune" / "k" / "best.pt"
    kept.write_bytes(b"y")
    done_export = cache / "exports" / ("e" * 64)
    done_export.mkdir()
    removed = {p for p, _ in inventory.collect_temporary(cache, older_than_s=0)}
    assert removed == {*leftovers, half_head, half_export, half_index, half_map} and kept.exists()
    assert done_export.exists()


# --------------------------------------------------------------------------- a cache a team shares


def test_files_and_folders_get_the_users_umask(tmp_path):
    written = atomic.write_text(tmp_path / "a" / "x.json", "{}")
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~atomic.UMASK
    head = save_head(tmp_path, "h" * 64, {"w": np.ones(2)}, {"kind": "ridge"})
    assert stat.S_IMODE(head.stat().st_mode) == 0o777 & ~atomic.UMASK


def test_an_unchanged_manifest_is_not_rewritten(tiny_config):
    """So a cache on a read-only disk can be planned: nothing is written when nothing changed."""
    cfg = tiny_config()
    manifest = split_plans(cfg)["train"].manifest
    before = manifest.stat().st_mtime_ns
    time.sleep(0.01)
    assert split_plans(cfg)["train"].manifest == manifest and manifest.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- one-line failures


@pytest.mark.slow
def test_a_failed_run_from_the_shell_ends_in_one_error_line_without_tracebacks(tiny_config, tmp_path):
    import subprocess
    import sys

    from helpers import write_config

    cfg = tiny_config(heads=[{"kind": "logistic", "C": [1.0]}])
    (cfg.data.root / "class0" / "zero.png").write_bytes(b"")
    path = write_config(cfg, tmp_path / "bad.yaml")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "class0/zero.png" in errors[0] and "on_bad_image: skip" in errors[0]
    # the failed run's exception is stored by Prefect as JSON, as the README says, never pickled
    import json

    stored = list((Path(os.environ["PREFECT_HOME"]) / "storage").glob("*"))
    assert stored and all(isinstance(json.loads(p.read_bytes()), dict) for p in stored)


# --------------------------------------------------------------------------- a dry run runs no code


FACTORY = '''
from pathlib import Path
Path(__file__).with_name("imported.log").open("a").write("imported\\n")


def build(width=8):
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4))
'''


def _plan(path: Path):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=1800)


def _os_system_config(tiny_config, tmp_path: Path) -> tuple[Path, Path]:
    """A config whose backbone factory is ``os:system`` touching a marker file: (config, marker)."""
    import yaml

    marker = tmp_path / "pwned"
    cfg = tiny_config().model_dump(mode="json")
    cfg["backbone"] = {"source": "python", "name": "os:system", "kwargs": {"command": f"touch {marker}"},
                       "weights": "DEFAULT", "preprocess": {"resize": 32, "crop": 32, "interpolation": "bilinear",
                                                            "mean": [0.5] * 3, "std": [0.5] * 3}}
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, marker


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_plan_never_calls_a_factory_named_in_a_config(tiny_config, tmp_path):
    path, marker = _os_system_config(tiny_config, tmp_path)
    done = _plan(path)
    assert not marker.exists()
    assert done.returncode == 0 and "is code (source: python): `transferpipe plan` neither imports nor calls it" in (
        done.stderr + done.stdout), done.stderr
    assert "computes, and so does every later stage" in done.stdout


def test_the_notebook_reader_never_calls_a_factory_named_in_a_config(tiny_config, tmp_path):
    """``cached_features`` computes nothing: before, it called ``os:system`` named as a backbone factory."""
    from flows.notebook import NotCached, cached_features

    path, marker = _os_system_config(tiny_config, tmp_path)
    with pytest.raises(NotCached, match=r"reading never runs a config's code: `transferpipe extract .*hostile.yaml`"):
        cached_features(path)
    assert not marker.exists()


@pytest.mark.slow
def test_plan_imports_no_module_beside_the_config_even_after_a_run(tiny_config, tmp_path):
    import yaml

    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow
    from flows.config import load_config

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "untrusted_models.py").write_text(FACTORY)  # a name no other test imports (sys.modules is shared)
    cfg = tiny_config(heads=[{"kind": "logistic", "C": [1.0]}]).model_dump(mode="json")
    cfg["backbone"] = {"source": "python", "name": "untrusted_models:build", "weights": "none",
                       "preprocess": {"resize": 32, "crop": 32, "interpolation": "bilinear",
                                      "mean": [0.5] * 3, "std": [0.5] * 3}}
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = _plan(path)  # nothing remembered yet: plan says what it cannot know without the code
    assert first.returncode == 0 and "neither imports nor calls it" in first.stdout, first.stdout + first.stderr
    assert not (folder / "imported.log").exists()
    with local_run_settings():
        pipeline_flow(load_config(path))  # a run is trusted to run the factory: it is remembered in the cache
    imports = (folder / "imported.log").read_text()
    again = _plan(path)
    assert again.returncode == 0 and "0 to compute" in again.stdout, again.stdout + again.stderr
    assert (folder / "imported.log").read_text() == imports  # plan imported nothing


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_a_server_that_is_not_there_is_named_before_anything_runs(tiny_config, tmp_path):
    import socket
    import subprocess
    import sys

    from helpers import write_config

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config(tiny_config(heads=[{"kind": "logistic", "C": [1.0]}]), tmp_path / "c.yaml")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=1800,
                          env={**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
    assert done.returncode == 1 and done.stderr.startswith(
        f"error: the Prefect server at http://127.0.0.1:{port}/api (PREFECT_API_URL) refuses connections"), done.stderr
    assert nothing_extracted(tiny_config())


# --------------------------------------------------------------------------- hostile tar shards


def _shards(tmp_path: Path) -> list[Path]:
    from helpers import make_shards

    return make_shards(make_imagefolder(tmp_path / "images"), tmp_path / "shards", per_shard=9)


def _header_field(shard: Path, member: int, start: int, width: int, value: bytes) -> None:
    """Overwrite one field of the ``member``-th ustar header (0-based; every member here is < 512 bytes of data
    after the first, so headers are found by walking) and fix the header checksum."""
    data = bytearray(shard.read_bytes())
    pos = 0
    for _ in range(member):
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0] or b"0", 8)
        pos += 512 + (size + 511) // 512 * 512
    data[pos + start : pos + start + width] = value.ljust(width, b"\0")[:width]
    data[pos + 148 : pos + 156] = b" " * 8
    data[pos + 148 : pos + 156] = f"{sum(data[pos : pos + 512]):06o}\0 ".encode()
    shard.write_bytes(bytes(data))


def _wds(tmp_path: Path, on_bad_image: str = "error") -> DataConfig:
    return DataConfig(source="webdataset", shards=str(tmp_path / "shards" / "shard-{000..001}.tar"),
                      val_fraction=0, test_fraction=0, on_bad_image=on_bad_image)


@pytest.mark.parametrize("size", [b"-1000", b"9999", b"0x1f", b"77777777777"])
def test_a_tar_size_field_that_is_negative_not_octal_or_past_the_end_is_named_not_a_hang(tmp_path, size):
    """A size of -1000 moved the header scan backwards: every command that scanned the shards hung."""
    import subprocess
    import sys

    shards = _shards(tmp_path)
    _header_field(shards[0], 2, 124, 12, size)
    script = ("from tasks.data import DataConfig, build_manifest; import sys\n"
              f"build_manifest(DataConfig(source='webdataset', shards={str(tmp_path / 'shards' / 'shard-{000..001}.tar')!r}, "
              "val_fraction=0, test_fraction=0, on_bad_image='skip'), sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(DataError, match=r"shard-000.tar: (unreadable tar header at byte 3072 after 2 "
                                           r"member\(s\) \(not an octal number|member .* is cut short)"):
        build_manifest(_wds(tmp_path), tmp_path / "cache")


def test_a_shard_cut_short_while_it_is_read_is_an_error_naming_it_not_a_sigbus(tmp_path):
    """Through a memory map, a read past the file's new end killed the interpreter (SIGBUS, rc 135)."""
    import subprocess
    import sys

    shard = _shards(tmp_path)[0]
    script = ("import os, sys\nfrom tasks.data import tar_index\n"
              "path = sys.argv[1]\nfound = tar_index.index(path)\nlast = list(found.samples.values())[-1]\n"
              "with tar_index.reader(path) as read:\n"
              "    os.truncate(path, 1024)\n"
              "    try:\n        read(next(iter(last.values())))\n"
              "    except tar_index.ShardError as exc:\n        print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(shard)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert f"shard {shard} changed while it was read" in done.stdout


def test_tar_oddities_name_the_shard_and_sample_and_follow_on_bad_image(tmp_path, caplog):
    """A member name that is not UTF-8, a 20-digit pax length, a 2-million-digit label, a sample key twice,
    an empty shard: each is named (shard + key), fails with ``error`` and is left out with ``skip``."""
    import io
    import tarfile

    shards = _shards(tmp_path)
    with tarfile.open(shards[1], "a", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in ((b"class0_bad\xff.cls".decode("utf-8", "surrogateescape"), b"class0"),
                           ("class2_005.cls", b"class2"), ("huge_label.png", shards[0].read_bytes()[:10]),
                           ("huge_label.cls", b"7" * 2_000_000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError) as err:
        build_manifest(_wds(tmp_path), tmp_path / "cache")
    message = str(err.value)
    assert r"shard-001.tar/class0_bad\xff: its member names are not UTF-8" in message
    assert "shard-001.tar/class2_005: the shard holds sample key 'class2_005' more than once" in message
    assert "shard-001.tar/huge_label: its 'cls' member is 2,000,000 bytes: not a label" in message
    kept = build_manifest(_wds(tmp_path, "skip"), tmp_path / "cache")
    assert len(kept.splits["train"]) == 17  # 18 samples, less the duplicated one

    (tmp_path / "shards" / "shard-002.tar").write_bytes(b"")
    pax = tmp_path / "shards" / "shard-003.tar"
    record = b"99999999999999999999 path=x\n"
    header = tarfile.TarInfo("PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(record)
    pax.write_bytes(header.tobuf(format=tarfile.USTAR_FORMAT) + record.ljust(512, b"\0") + bytes(1024))
    cfg = DataConfig(source="webdataset", shards=str(tmp_path / "shards" / "shard-{000..003}.tar"),
                     val_fraction=0, test_fraction=0, on_bad_image="skip")
    with caplog.at_level("WARNING", logger="transferpipe.data"):
        build_manifest(cfg, tmp_path / "cache")
    assert "shard-002.tar is empty (0 bytes)" in caplog.text
    assert "shard-003.tar is not a readable tar file (OverflowError" in caplog.text  # was: an abort, named nothing


def test_a_served_deployment_runs_only_the_config_and_cache_it_was_served_with(tmp_path, monkeypatch):
    """`prefect deployment run … --param config=evil.yaml` on the unauthenticated loopback API made the serving
    user run that file; the flow now refuses any config or cache folder but the served ones, before reading it."""
    import json

    from flows.config import ConfigError
    from flows.operations.serve import SERVED_ENV, pipeline_from_config

    served, evil = tmp_path / "served.yaml", tmp_path / "evil.yaml"
    monkeypatch.setenv(SERVED_ENV, json.dumps({"config": str(served), "cache_dir": None}))
    with pytest.raises(ConfigError, match=r"this deployment serves config '.*served.yaml' only; a run asked for "
                                          r"'.*evil.yaml': refused"):
        pipeline_from_config.fn(str(evil))
    with pytest.raises(ConfigError, match=r"serves cache_dir None only; a run asked for '.*elsewhere'"):
        pipeline_from_config.fn(str(served), str(tmp_path / "elsewhere"))


@pytest.mark.slow  # two subprocesses that import Prefect
@pytest.mark.parametrize("flag, named", [([], "the cache folder"), (["--cache-dir", "{tmp}/cache"], "Prefect's home")])
def test_a_home_that_cannot_be_created_is_one_line_naming_the_folder(tmp_path, flag, named):
    """Issue 43: a HOME that cannot be created made `transferpipe demo` print 52 tracebacks over 4 minutes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRANSFERPIPE_"))}
    env["HOME"] = "/proc/no-such-home"  # /proc takes no new folders, even for root
    args = [a.replace("{tmp}", str(tmp_path)) for a in flag]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "demo", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{named}" in done.stderr and "/proc/no-such-home/" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
