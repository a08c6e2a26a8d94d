"""Pipeline wall time cold, warm (all cached) and after changing one head, in one process.

All runs share one Prefect ephemeral server (started before any timing), so
the figures compare the pipeline, not server start-up. Prints warm/cold and
one-head/cold, and the warm run's overhead over a trivial flow. Not a test.

    python -m benchmarks.rerun [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from prefect import flow

from benchmarks import QUICK_DIGITS, parse_args
from flows.config import parse_config
from flows.pipeline import pipeline_flow
from flows.execution.local import local_run_settings


@flow(name="trivial")
def trivial() -> int:
    return 1


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), {})
    with tempfile.TemporaryDirectory() as cache, local_run_settings():
        heads = [{"kind": "logistic", "shots": [1, 5, "all"], "seeds": 2}, {"kind": "knn", "k": [1, 5, 10]}]
        raw = {"name": "rerun-bench", "data": QUICK_DIGITS if args.quick else {"source": "digits"}, "cache_dir": cache, "heads": heads,
               "backbone": {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}}}
        trivial()  # starts the ephemeral server: not part of any figure
        t_trivial = min(timed(trivial) for _ in range(3))
        cold = timed(pipeline_flow, parse_config(raw))
        warm = timed(pipeline_flow, parse_config(raw))
        changed = {**raw, "heads": [heads[0], {"kind": "knn", "k": [1, 5, 10, 20]}]}
        one_head = timed(pipeline_flow, parse_config(changed))
    print("rerun benchmark: digits, resnet18 @ 32 px, logistic (1/5/all shots x 2 seeds) + kNN, evaluate; same process")
    print(f"  cold (extract + heads + evaluate)     {cold:7.2f} s   1.00")
    print(f"  warm (every stage a cache hit)        {warm:7.2f} s   warm/cold {warm / cold:.2f}")
    print(f"  one head changed (kNN k grid)         {one_head:7.2f} s   one-head/cold {one_head / cold:.2f}")
    print(f"  trivial flow                          {t_trivial:7.2f} s   warm overhead over it {warm - t_trivial:.2f} s")


if __name__ == "__main__":
    main()
