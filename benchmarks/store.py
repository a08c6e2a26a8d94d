"""Feature store throughput against plain numpy on the same bytes, same run.

Write: FeatureWriter.append in extraction-sized batches (flush + rows_done per
batch) and complete() (checksums, fsync, rename) versus one sequential
``np.save`` + fsync. Read: FeatureStore.read (invariants + checksums of
everything read) versus ``np.load``. Prints MB/s and store/numpy ratios, and
rows/s of the write path: compare it with the images/s of benchmarks/extract.py
to see that the store does not limit extraction. Not a test.

    python -m benchmarks.store [--rows 50000] [--dim 2048] [--batch 256] [--quick]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import parse_args
from storage.features import FeatureStore


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    args = parse_args(parser, {"rows": 2_000, "dim": 256})

    rng = np.random.default_rng(0)
    features = rng.standard_normal((args.rows, args.dim), dtype=np.float32).astype(args.dtype)
    labels = rng.integers(0, 1000, args.rows)
    paths = [f"class{y}/{i:07d}.jpg" for i, y in enumerate(labels)]
    mb = features.nbytes / 1e6

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)

        def numpy_write() -> None:
            with open(tmp / "plain.npy", "wb") as fh:
                np.save(fh, features)
                fh.flush()
                os.fsync(fh.fileno())

        store = FeatureStore(tmp / "cache")
        key = "b" * 64
        spec = {"dtype": args.dtype, "layers": ["penultimate"], "format_version": 1}

        def store_write() -> None:
            writer = store.writer(
                key, spec=spec, classes=[str(c) for c in range(1000)], dims={"penultimate": args.dim},
                total=args.rows, batch_size=args.batch, versions={},
            )
            with writer:
                for start in range(0, args.rows, args.batch):
                    writer.append({"penultimate": features[start : start + args.batch]})
                writer.complete(labels, paths)

        t_np_w = timed(numpy_write)
        t_st_w = timed(store_write)
        t_np_r = timed(lambda: np.load(tmp / "plain.npy"))
        t_st_r = timed(lambda: store.read(key))
        assert np.array_equal(store.read(key).features["penultimate"], features)

    print(f"store benchmark: {args.rows} x {args.dim} {args.dtype} ({mb:.0f} MB), batches of {args.batch}")
    print(f"  write  numpy.save+fsync {mb / t_np_w:8.0f} MB/s   store {mb / t_st_w:8.0f} MB/s   store/numpy {t_np_w / t_st_w:.2f}")
    print(f"  read   numpy.load       {mb / t_np_r:8.0f} MB/s   store {mb / t_st_r:8.0f} MB/s   store/numpy {t_np_r / t_st_r:.2f}")
    print(f"  store write path: {args.rows / t_st_w:,.0f} rows/s (extraction must produce more than this to be limited by it)")


if __name__ == "__main__":
    main()
