"""Sharded extraction: whole-batch shards, joined with HDF5 virtual datasets; on a real 2-worker Dask cluster."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from storage import inventory
from storage.features import CorruptFeatureFile, FeatureStore
from helpers import split_plans
from tasks.extract import extract_split
from tasks.shards import JoinPlan, extract_shard, join_shards, plan_shards


def test_shards_are_whole_batches_covering_the_split_once(tiny_config):
    train = split_plans(tiny_config())["train"]  # 12 rows, batches of 4
    assert [(s.start, s.stop) for s in plan_shards(train, 2)] == [(0, 8), (8, 12)]
    assert [(s.start, s.stop) for s in plan_shards(train, 3)] == [(0, 4), (4, 8), (8, 12)]
    assert [(s.start, s.stop) for s in plan_shards(train, 99)] == [(0, 4), (4, 8), (8, 12)]  # no empty shard
    assert [(s.start, s.stop) for s in plan_shards(train, 1)] == [(0, 12)]
    assert [s.part for s in plan_shards(train, 2)] == ["00000000-00000008", "00000008-00000012"]


def test_joined_shards_read_exactly_like_a_single_process_file(tiny_config, tmp_path):
    one = split_plans(tiny_config())["train"]
    sharded = split_plans(tiny_config(cache_dir=str(tmp_path / "sharded")))["train"]
    whole = extract_split(one)
    shards = plan_shards(sharded, 3)
    assert sum(extract_shard(s).forward_batches for s in shards) == whole.forward_batches
    joined = join_shards(JoinPlan(split=sharded, parts=[s.part for s in shards]))
    assert joined.key == whole.key and joined.rows == whole.rows and not joined.cache_hit
    a, b = FeatureStore(one.cache_dir).read(one.key), FeatureStore(sharded.cache_dir).read(sharded.key)
    assert np.array_equal(a.features["penultimate"], b.features["penultimate"]) and a.paths == b.paths
    assert np.array_equal(a.labels, b.labels)
    with h5py.File(whole.path) as f1, h5py.File(joined.path) as f2:
        assert f2["features/penultimate"].is_virtual and not f1["features/penultimate"].is_virtual
        assert f1.attrs["checksums"] == f2.attrs["checksums"]  # the same bytes, so the same digests
    store = FeatureStore(sharded.cache_dir)
    assert store.verify(sharded.key) == []
    # the features are not copied: the joined file is metadata, labels and paths
    assert joined.path.stat().st_size < sum(p.stat().st_size for p in store.shards(sharded.key).root.glob("*.h5"))
    # a second join is a cache hit on the joined file; rm takes the shards with it
    assert extract_split(sharded).cache_hit
    removed = store.remove(sharded.key)
    assert store.shards(sharded.key).root in removed and not store.shards(sharded.key).root.exists()


def test_a_missing_shard_is_never_read_as_zeros(tiny_config):
    plan = split_plans(tiny_config())["train"]
    shards = plan_shards(plan, 2)
    for s in shards:
        extract_shard(s)
    join_shards(JoinPlan(split=plan, parts=[s.part for s in shards]))
    store = FeatureStore(plan.cache_dir)
    store.shards(plan.key).path(shards[1].part).unlink()
    assert store.lookup(plan.key) is None  # quarantined: "shard file(s) ... are missing"
    assert list((store.root / "quarantine").glob(f"{plan.key}.h5.corrupt-*"))
    result = extract_split(plan)  # a plain rerun recomputes the split in one process
    assert not result.cache_hit and store.verify(plan.key) == []


def test_a_corrupt_shard_fails_the_join_by_name_and_is_recomputed_on_rerun(tiny_config):
    plan = split_plans(tiny_config())["train"]
    shards = plan_shards(plan, 2)
    for s in shards:
        extract_shard(s)
    bad = FeatureStore(plan.cache_dir).shards(plan.key).path(shards[0].part)
    with h5py.File(bad, "r+") as fh:
        fh["features/penultimate"][0, 0] += 1
    with pytest.raises(CorruptFeatureFile, match=f"shard\\(s\\) {bad} .* failed their checksums and were quarantined"):
        join_shards(JoinPlan(split=plan, parts=[s.part for s in shards]))
    assert not bad.exists() and not FeatureStore(plan.cache_dir).partial_path(plan.key).exists()
    assert extract_shard(shards[0]).forward_batches == 2 and extract_shard(shards[1]).cache_hit
    join_shards(JoinPlan(split=plan, parts=[s.part for s in shards]))
    assert FeatureStore(plan.cache_dir).verify(plan.key) == []


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
    single = tiny_config(heads=heads)
    sharded = tiny_config(heads=heads, cache_dir=str(tmp_path / "sharded"), dask={"workers": 2})
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.url)  # the worker processes read the environment
    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        expected = extract_flow(single)
        got = extract_flow(sharded)
        again = extract_flow(sharded)  # all stored: no cluster is started, plain cache hits
        trained = pipeline_flow(sharded, stop_after="heads").heads
    for split, result in expected.items():
        a = FeatureStore(single.cache_dir).read(result.key)
        b = FeatureStore(sharded.cache_dir).read(got[split].key)
        assert np.array_equal(a.features["penultimate"], b.features["penultimate"]) and a.paths == b.paths
        assert got[split].forward_batches == result.forward_batches and not got[split].cache_hit
        with h5py.File(got[split].path) as fh:
            assert fh["features/penultimate"].is_virtual
            assert len(fh["features/penultimate"].virtual_sources()) == min(2, -(-result.rows // 4))
    assert all(r.cache_hit for r in again.values())
    assert trained[0].records[0].val_accuracy >= 0
    # an existing scheduler, by address: the same features again
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        by_address = tiny_config(heads=heads, cache_dir=str(tmp_path / "address"),
                                 dask={"address": cluster.scheduler_address, "shards": 3})
        with temporary_settings({PREFECT_API_URL: prefect_server.url}):
            remote = extract_flow(by_address)
    train = FeatureStore(by_address.cache_dir).read(remote["train"].key)
    assert np.array_equal(train.features["penultimate"],
                          FeatureStore(single.cache_dir).read(expected["train"].key).features["penultimate"])
    with h5py.File(remote["train"].path) as fh:
        assert len(fh["features/penultimate"].virtual_sources()) == 3
    runs = prefect_server.api("POST", "/task_runs/filter", json={"task_runs": {"name": {"like_": "extract-resnet18-train-shard"}}})
    assert sorted(r["name"].removeprefix("extract-resnet18-train-") for r in runs) == [
        "shard1of2", "shard1of3", "shard2of2", "shard2of3", "shard3of3"]


def test_gc_removes_stale_partial_shards_and_keeps_complete_ones(tiny_config, monkeypatch):
    import os
    import time

    from storage.faults import ENV, InjectedFault

    plan = split_plans(tiny_config())["train"]
    second, first = plan_shards(plan, 2)  # rows 0-8 (two batches), 8-12
    extract_shard(first)
    monkeypatch.setenv(ENV, "extract.batch:2:raise")  # the other shard stops after one flushed batch
    with pytest.raises(InjectedFault):
        extract_shard(second)
    monkeypatch.delenv(ENV)
    store = FeatureStore(plan.cache_dir)
    partial = store.shards(plan.key).partial_path(second.part)
    assert partial.exists()
    assert inventory.collect(store, partial_older_than_s=3600) == []  # fresh: kept
    old = time.time() - 2 * 3600
    os.utime(partial, (old, old))
    removed = inventory.collect(store, partial_older_than_s=3600)
    assert [p for p, _ in removed] == [partial] and not partial.exists()
    assert store.shards(plan.key).lookup(first.part) is not None  # the complete shard stays
