"""Extraction over Dask: whole pieces dealt to the workers, joined as in one process; on a real 2-worker cluster."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from storage.features import FeatureStore
from helpers import split_plans, write_config
from tasks.extract.stage import extract_split
from tasks.extract.groups import plan_groups


def test_pieces_are_dealt_to_workers_whole_in_row_order(tiny_config):
    train = split_plans(tiny_config(extract={"piece_size": 2}))["train"]
    for count in (1, 2, 3, 99):
        groups = plan_groups(train, count)
        assert [p for g in groups for p in g.pieces] == list(train.pieces)  # each piece once, in order
        assert len(groups) == min(count, len(train.pieces)) and all(g.pieces for g in groups)
        assert len({g.key for g in groups}) == len(groups) and {g.count for g in groups} == {len(groups)}
    extract_split(train)
    assert plan_groups(train, 2)[0].pieces == []  # nothing left to deal


def same_to_float16_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """A Dask worker runs torch on one thread (Dask sets OMP_NUM_THREADS=1); with every forward pass of the
    same shape (short batches padded) its features are a two-thread process's, bit for bit."""
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.server
def test_a_two_worker_local_cluster_extracts_the_same_features_and_heads_read_them(
    prefect_server, tiny_config, tmp_path, monkeypatch
):
    """prefect-dask on a real LocalCluster (2 worker processes) against a real Prefect server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline_flow

    def extract_flow(cfg):
        return pipeline_flow(cfg, stop_after="extract").features

    heads = [{"kind": "knn", "k": [1, 3]}]
    pieces = {"piece_size": 2}
    single = tiny_config(heads=heads, extract=pieces)
    sharded = tiny_config(heads=heads, extract=pieces, cache_dir=str(tmp_path / "sharded"), dask={"workers": 2})
    omp = os.environ.get("OMP_NUM_THREADS")
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)  # the worker processes read the environment
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        expected = extract_flow(single)
        got = extract_flow(sharded)
        again = extract_flow(sharded)  # all stored: no cluster is started, plain cache hits
        trained = pipeline_flow(sharded, stop_after="heads").heads
    for split, result in expected.items():
        a = FeatureStore(single.cache_dir).read(result.key)
        b = FeatureStore(sharded.cache_dir).read(got[split].key)
        same_to_float16_rounding(a.features["penultimate"], b.features["penultimate"])
        assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
        assert got[split].forward_batches == result.forward_batches and not got[split].cache_hit
        with h5py.File(got[split].path) as fh:
            assert len(fh["features/penultimate"].virtual_sources()) == len(split_plans(sharded)[split].pieces)
    assert all(r.cache_hit for r in again.values())
    assert trained[0].records[0].val_accuracy >= 0
    # an existing scheduler, by address: the same features again
    from distributed import LocalCluster

    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == omp  # the flow put it back
    monkeypatch.setattr(os, "environ", os.environ.copy())  # a LocalCluster sets OMP_NUM_THREADS=1 here too
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        by_address = tiny_config(heads=heads, extract=pieces, cache_dir=str(tmp_path / "address"),
                                 dask={"address": cluster.scheduler_address, "shards": 3})
        with temporary_settings({PREFECT_API_URL: prefect_server.url}):
            remote = extract_flow(by_address)
    train = FeatureStore(by_address.cache_dir).read(remote["train"].key)
    same_to_float16_rounding(train.features["penultimate"],
                             FeatureStore(single.cache_dir).read(expected["train"].key).features["penultimate"])
    runs = prefect_server.api("POST", "/task_runs/filter", json={"task_runs": {"name": {"like_": "extract-resnet18-train-pieces"}}})
    assert sorted(r["name"].removeprefix("extract-resnet18-train-") for r in runs) == [
        "pieces1of2", "pieces1of3", "pieces2of2", "pieces2of3", "pieces3of3"]


@pytest.mark.slow
@pytest.mark.server
def test_two_dask_workers_with_their_own_prefect_homes_share_one_cache(prefect_server, tiny_config, tmp_path):
    """Two machines in miniature: a scheduler and two worker processes, each worker with its own PREFECT_HOME,
    one cache folder. Every piece is extracted once, the records land in the cache (not in a worker's home),
    and a flow run from a third home finds every piece cached."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from distributed import Client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline_flow

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = Path(sys.executable).with_name("dask")
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=prefect_server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(2):
        env = prefect_server.env()
        env["PREFECT_HOME"] = str(tmp_path / f"home-{i}")
        procs.append(subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--no-dashboard",
                                       "--name", f"machine-{i}"], env=env, cwd=Path(__file__).resolve().parents[1],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        with Client(address, timeout=600) as client:
            client.wait_for_workers(2, timeout=600)
        pieces = {"piece_size": 2}
        single = tiny_config(extract=pieces)
        shared = tiny_config(extract=pieces, cache_dir=str(tmp_path / "shared"), dask={"address": address, "shards": 4})
        with temporary_settings({PREFECT_API_URL: prefect_server.url}):
            expected = pipeline_flow(single, stop_after="extract").features
            got = pipeline_flow(shared, stop_after="extract").features
        for split, result in expected.items():
            a = FeatureStore(single.cache_dir).read(result.key)
            b = FeatureStore(shared.cache_dir).read(got[split].key)
            same_to_float16_rounding(a.features["penultimate"], b.features["penultimate"])
            assert a.paths == b.paths
            assert got[split].forward_batches == result.forward_batches  # each piece once, none twice
        records = {p.name for p in (shared.cache_dir / "prefect-records").iterdir()}
        assert any(name.startswith("extract-pieces-") for name in records)  # written by the workers
        for i in range(2):
            assert not list((tmp_path / f"home-{i}").glob("storage/extract-pieces-*"))
        config = write_config(shared, tmp_path / "shared.yaml")
        third = subprocess.run([sys.executable, "-c", THIRD, str(config)], capture_output=True, text=True, timeout=1800,
                               env={**prefect_server.env(), "PREFECT_HOME": str(tmp_path / "home-2")},
                               cwd=Path(__file__).resolve().parents[1])
        assert third.returncode == 0 and third.stdout.split()[-1] == "0", third.stderr[-3000:]  # no forward pass
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=120)


THIRD = """
import sys
from flows.config import load_config
from flows.pipeline import pipeline_flow
ran = pipeline_flow(load_config(sys.argv[1]), stop_after="extract")
print(sum(r.forward_batches for r in ran.features.values()))
"""
