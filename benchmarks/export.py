"""Features out: export throughput, retrieval evaluation at growing gallery sizes, FAISS against exact search.

1. Export of one split (synthetic features in a real cache file) as Parquet and as NumPy by the stage
   (``tasks.export.stage.export_split``: checksum-verified reads, row groups, atomic publish) against a plain script
   that reads the HDF5 dataset with h5py in the same chunks and writes the same columns with pyarrow: rows/s,
   MB/s of features, ratio to the plain script.
2. Retrieval evaluation (Recall@k, mAP@R; ``tasks.index.retrieval``) of the same queries against galleries of 10k, 100k
   and 1M rows (1,000 classes, so R grows with the gallery), each in its own process from an HDF5 file: seconds
   and peak RSS, as ratios to the 10k gallery.
3. FAISS on the largest gallery: HNSW and IVF against the exact blockwise search on held-out queries:
   recall@10, build seconds, queries per second and the speed-up.

    python -m benchmarks.export [--rows 200000] [--dim 512] [--sizes 10000,100000,1000000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import parse_args
from storage.features import FeatureStore

KEY = "e" * 64
CLASSES = 1000


def write_split(cache: Path, rows: int, dim: int, key: str = KEY, classes: int = CLASSES, seed: int = 0) -> Path:
    """A complete feature file of ``rows`` clustered float16 rows: the same ``classes`` class means in every
    file, plus noise drawn from ``seed``."""
    centres = np.random.default_rng(12345).standard_normal((classes, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)

    def blocks():
        for start in range(0, rows, 16384):
            y = labels[start : start + 16384]
            x = centres[y] + 1.1 * rng.standard_normal((len(y), dim), dtype=np.float32)
            yield {"penultimate": x.astype(np.float16)}

    return FeatureStore(cache).write(key, blocks(), labels, classes=[f"c{i}" for i in range(classes)],
                                     dims={"penultimate": dim},
                                     spec={"dtype": "float16", "layers": ["penultimate"], "format_version": 1},
                                     paths=[f"c{y}/{i:08d}.jpg" for i, y in enumerate(labels)])


def plain_export(h5: Path, out: Path, chunk: int) -> None:
    """What a user would write by hand: h5py reads, pyarrow writes the same columns and row groups."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    with h5py.File(h5, "r") as fh:
        ds, labels, ids = fh["features/penultimate"], fh["labels"][()], fh["paths"].asstr()[()]
        classes = np.asarray(json.loads(fh.attrs["classes"]), dtype=object)
        dim = ds.shape[1]
        schema = pa.schema([("id", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                            ("split", pa.string()), ("embedding", pa.list_(pa.float16(), dim))])
        with pq.ParquetWriter(out, schema, compression="zstd", use_dictionary=["label", "class", "split"]) as w:
            for start in range(0, ds.shape[0], chunk):
                x = ds[start : start + chunk]
                y = labels[start : start + chunk]
                w.write_table(pa.table({"id": ids[start : start + chunk], "label": y, "class": classes[y],
                                        "split": ["train"] * len(y),
                                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)},
                                       schema=schema), row_group_size=len(y))


def export_rows(tmp: Path, rows: int, dim: int) -> list[list[str]]:
    from tasks.export.plan import ExportConfig, plan_export
    from tasks.export.stage import export_split

    cache = tmp / "cache"
    h5 = write_split(cache, rows, dim)
    mb = rows * dim * 2 / 1e6
    out = []
    plain_export(h5, tmp / "warm.parquet", 16384)  # imports and the page cache, for both sides
    started = time.perf_counter()
    plain_export(h5, tmp / "plain.parquet", 16384)
    base = time.perf_counter() - started
    out.append(["plain script (h5py + pyarrow)", f"{rows / base:,.0f}", f"{mb / base:,.0f}", "1.00"])
    for fmt in ("parquet", "npy"):
        plan = plan_export(ExportConfig(format=fmt), "train", KEY, cache)
        started = time.perf_counter()
        export_split(plan)
        took = time.perf_counter() - started
        out.append([f"transferpipe export --format {fmt}", f"{rows / took:,.0f}", f"{mb / took:,.0f}",
                    f"{base / took:.2f}"])
    return out


CHILD = """
import json, resource, sys, time
from pathlib import Path
from tasks.index.retrieval import Rows, retrieval_metrics
from storage.features import FeatureStore
cache, query_key, gallery_key = sys.argv[1:4]
store = FeatureStore(Path(cache))
started = time.perf_counter()
found = retrieval_metrics(Rows.stored(store.rows(query_key, "penultimate")),
                          Rows.stored(store.rows(gallery_key, "penultimate")), [1, 5, 10], "cosine",
                          memory_bytes=float(sys.argv[4]))
found["seconds"] = time.perf_counter() - started
found["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(found))
"""


def retrieval_rows(tmp: Path, sizes: list[int], dim: int, queries: int) -> tuple[list[list[str]], dict[int, str]]:
    cache = tmp / "retrieval"
    qkey = "a" * 64
    write_split(cache, queries, dim, key=qkey, seed=1)
    keys, out, base = {}, [], None
    for n in sizes:
        keys[n] = f"{n:064d}"
        write_split(cache, n, dim, key=keys[n], seed=0)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, str(cache), qkey, keys[n], str(2**30)],
                              capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        wall = time.perf_counter() - started
        found = json.loads(done.stdout.strip().splitlines()[-1])
        base = base or (found["seconds"], found["peak_rss"])
        out.append([f"{n:,}", f"{found['recall_at_1']:.3f}", f"{found['map_at_r']:.3f}", f"{found['seconds']:.2f}",
                    f"{found['seconds'] / base[0]:.1f}", f"{found['peak_rss'] / 2**20:,.0f}",
                    f"{found['peak_rss'] / base[1]:.2f}", f"{wall:.1f}"])
    return out, keys


def index_rows(tmp: Path, key: str, queries: int) -> list[list[str]]:
    from tasks.index.plan import IndexConfig, plan_index
    from tasks.index.stage import build_index

    out = []
    for kind in ("flat", "hnsw", "ivf"):
        plan = plan_index(IndexConfig(kind=kind, queries=queries), "train", key, tmp / "retrieval", "a" * 64)
        r = build_index(plan)
        out.append([kind, f"{r.rows:,}", f"{r.recall_at_k:.3f}", f"{r.build_seconds:.1f}",
                    f"{r.index_bytes / 2**20:,.0f}", f"{r.qps_index:,.0f}", f"{r.qps_exact:,.0f}", f"{r.speedup:.1f}"])
    return out


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n**{title}**\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the exported split")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes of the retrieval runs")
    parser.add_argument("--queries", type=int, default=1000)
    args = parse_args(parser, {"rows": 5_000, "dim": 64, "sizes": "2000,8000", "queries": 200})
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        table(f"export of {args.rows:,} rows x {args.dim} float16 (ratio: plain script time / this time)",
              ["writer", "rows/s", "MB/s", "ratio"], export_rows(tmp, args.rows, args.dim))
        rows, keys = retrieval_rows(tmp, sizes, 128, args.queries)
        table(f"retrieval evaluation, {args.queries} queries x 128 dims, {CLASSES} classes, cosine, exact "
              "(one process each; ratios to the smallest gallery)",
              ["gallery rows", "Recall@1", "mAP@R", "seconds", "x time", "peak RSS MiB", "x RSS", "process s"], rows)
        table(f"FAISS over the {sizes[-1]:,}-row gallery, {args.queries} held-out queries (speed-up: QPS index / "
              "QPS exact blockwise search)", ["index", "rows", "recall@10", "build s", "MiB", "QPS index",
                                               "QPS exact", "speed-up"], index_rows(tmp, keys[sizes[-1]], args.queries))
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
