"""Extraction in one process versus sharded over a 2-worker Dask LocalCluster (prefect-dask).

Both runs extract the same digits splits (resnet18 @ 64 px, random init) into
separate caches, against one real Prefect server (started here unless
PREFECT_API_URL names one). The sharded figure includes starting the cluster
and joining the shards. Prints sharded/single, the join's share, and checks
the features are identical. Not a test.

    python -m benchmarks.scale_out [--workers 2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks import QUICK_DIGITS, parse_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parse_args(parser, {"workers": 1})  # quick: one worker still shards, joins and compares
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        from flows.execution.server import start_server

        server = start_server()
        os.environ.update(server[0].env())
    try:
        run(args.workers, args.quick)
    finally:
        if server:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            from flows.execution.server import stop_server

            APILogWorker.drain_all(timeout=10)  # this run's logs and events, while the server can take them
            EventsWorker.drain_all(timeout=10)
            stop_server(*server)


def run(workers: int, quick: bool = False) -> None:
    from flows.config import parse_config
    from flows.pipeline import pipeline_flow
    from storage.features import FeatureStore

    def extract_flow(cfg):
        return pipeline_flow(cfg, stop_after="extract").features

    with tempfile.TemporaryDirectory() as tmp:
        raw = {"name": "scale-bench", "data": QUICK_DIGITS if quick else {"source": "digits"}, "extract": {"batch_size": 64},
               "backbone": {"name": "resnet18", "weights": "none", "preprocess": {"resize": 64, "crop": 64}}}
        single = parse_config({**raw, "cache_dir": f"{tmp}/single"})
        sharded = parse_config({**raw, "cache_dir": f"{tmp}/sharded", "dask": {"workers": workers}})
        t0 = time.perf_counter()
        one = extract_flow(single)
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        many = extract_flow(sharded)
        t_sharded = time.perf_counter() - t0
        same = all(
            np.array_equal(FeatureStore(single.cache_dir).read(r.key).features["penultimate"],
                           FeatureStore(sharded.cache_dir).read(many[s].key).features["penultimate"])
            for s, r in one.items()
        )
        t0 = time.perf_counter()
        for r in many.values():
            FeatureStore(sharded.cache_dir).read(r.key)
        t_read_vds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in one.values():
            FeatureStore(single.cache_dir).read(r.key)
        t_read = time.perf_counter() - t0
    rows = sum(r.rows for r in one.values())
    print(f"scale-out benchmark: digits ({rows} images), resnet18 @ 64 px, {os.cpu_count()} cores, same run")
    print(f"  one process (torch threads {__import__('torch').get_num_threads()})  {t_single:7.2f} s   1.00")
    print(f"  {workers} Dask workers x 1 thread, incl. cluster start + join  {t_sharded:7.2f} s   "
          f"sharded/single {t_sharded / t_single:.2f}")
    compute_one = sum(r.seconds for r in one.values())
    compute_many = sum(r.seconds for r in many.values())
    print(f"  stage seconds (sum over splits; sharded = every shard + join)  single {compute_one:.2f} s, "
          f"sharded {compute_many:.2f} s; cluster start and scheduling ≈ {t_sharded - compute_many / workers:.1f} s")
    print(f"  read all splits: virtual datasets {t_read_vds:.3f} s vs plain files {t_read:.3f} s   "
          f"ratio {t_read_vds / max(t_read, 1e-9):.2f}")
    print(f"  features identical: {same}")


if __name__ == "__main__":
    main()
