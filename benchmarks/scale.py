"""Scale: wall time and peak memory of each stage at 1x, 10x and 100x its base size.

Each row runs in its own process (peak RSS from ``wait4``, so rows do not
share a high-water mark; torch, scikit-learn and h5py are imported before the
stage's clock starts, and "stage MiB" is what the stage added to the RSS of
those imports), and is printed as ratios to the 1x row of its stage:
time linear in size means ``time ratio ≈ size ratio``; flat memory means
``RSS ratio ≈ 1``. Feature files are real, written by the project's own store.

    python -m benchmarks.scale [--scales 1 10 100] [--stages manifest shards plan grow extract linear knn logistic evaluate]
    python -m benchmarks.scale --quick   # each stage once, at (mostly) a tenth of its base size: seconds
    python -m benchmarks.scale --imagenet-probe [--rows 1281167]   # one pass of the linear probe at ImageNet size

Stages at 1x: manifest 10,000 files; shards: the manifest of 10,000 WebDataset samples in 2 shards
(5,000 a shard: 1M samples are 200 shards at 100x), scanned cold; plan: ``transferpipe plan``'s whole graph
over the same shards once their scan is remembered (a plan ran before); grow: 2,000 samples in 10 shards
extracted (resnet18, 32 px), then one more shard added and extracted again (only its rows compute);
extract 1,000 PNGs (resnet18, 32 px);
linear / knn / logistic: 10,000 x 256 float16 features, 100 classes (linear and
knn stream from disk: heads' memory budget forced to ~0; logistic is scikit-learn,
in memory, for contrast); evaluate: 500 test images x 1,000 classes (metrics,
top-confusions chart). Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import parse_args

BASE = {"manifest": 10_000, "shards": 10_000, "plan": 10_000, "grow": 2_000, "extract": 1_000, "linear": 10_000, "knn": 10_000, "logistic": 10_000, "evaluate": 500}
DIM, CLASSES = 256, 100


# --------------------------------------------------------------------------- inputs (made once per size)


def empty_files(root: Path, n: int, classes: int = 100) -> Path:
    """``n`` empty .JPEG files in ``classes`` folders: what a manifest scan sees of a big folder."""
    if (root / ".done").exists():
        return root
    for i in range(n):
        folder = root / f"n{i % classes:05d}"
        if i < classes:
            folder.mkdir(parents=True, exist_ok=True)
        open(folder / f"{i:08d}.JPEG", "wb").close()
    (root / ".done").write_text("")
    return root


def tar_shards(root: Path, n: int, per_shard: int = 5_000, classes: int = 100) -> Path:
    """``n`` WebDataset samples (one 8x8 PNG, the same bytes, and a ``.cls`` label) in shards of ``per_shard``."""
    import io
    import tarfile

    from PIL import Image

    if (root / ".done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, "PNG")
    png = buf.getvalue()
    for s, start in enumerate(range(0, n, per_shard)):
        with tarfile.open(root / f"train-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, n)):
                for name, data in ((f"{i:09d}.png", png), (f"{i:09d}.cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / ".done").write_text("")
    return root


def tiny_pngs(root: Path, n: int, classes: int = 10) -> Path:
    from PIL import Image

    if (root / ".done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:07d}.png")
    (root / ".done").write_text("")
    return root


def synthetic_features(cache: Path, name: str, rows: int, dim: int = DIM, classes: int = CLASSES,
                       block: int = 65536, seed: int = 0) -> str:
    """A real feature file of Gaussian class clusters, written block by block (never whole in memory)."""
    from storage.features import FeatureStore
    from storage.keys import feature_key, feature_spec

    spec = feature_spec(backbone="synthetic", weights=f"clusters(seed={seed},classes={classes})", layers=["penultimate"],
                        pooling="avg", preprocess={}, dataset=f"{name}-{rows}x{dim}", split=name, dtype="float16",
                        precision="fp32")
    key = feature_key(spec)
    store = FeatureStore(cache)
    if store.lookup(key):
        return key
    centres = np.random.default_rng(12345).normal(0, 0.35, (classes, dim)).astype(np.float32)  # overlapping
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)

    def blocks():
        for start in range(0, rows, block):
            y = labels[start : start + block]
            noise = rng.standard_normal((len(y), dim), dtype=np.float32) * 2.0
            yield {"penultimate": (centres[y] + noise).astype(np.float16)}

    store.write(key, blocks(), labels, classes=[f"c{i}" for i in range(classes)], dims={"penultimate": dim},
                spec=spec, paths=[""] * rows)
    return key


# --------------------------------------------------------------------------- one stage, in a child process


def _manifest(n: int, work: Path) -> str:
    from tasks.data.config import DataConfig
    from tasks.data.manifest import build_manifest

    root = empty_files(work / f"files-{n}", n)
    m = build_manifest(DataConfig(source="imagefolder", root=root, val_fraction=0.02, test_fraction=0.05),
                       work / "cache")
    return f"{sum(len(v) for v in m.splits.values()):,} files"


def _shards(n: int, work: Path) -> str:
    from tasks.data.config import DataConfig
    from tasks.data.manifest import build_manifest

    root = tar_shards(work / f"shards-{n}", n)
    m = build_manifest(DataConfig(source="webdataset", shards=sorted(str(p) for p in root.glob("*.tar")),
                                  val_fraction=0.02, test_fraction=0.05), work / "cache")
    return f"{sum(len(v) for v in m.splits.values()):,} samples in {len(list(root.glob('*.tar')))} shards"


def _plan(n: int, work: Path) -> str:
    from flows.config import load_config
    from flows.planning.explain import explain

    steps = explain(load_config(plan_config(work, n)))
    pieces = [why for step in steps if step.stage == "extract" for why in step.why if why.startswith("pieces")]
    return f"{len(steps)} steps; train {pieces[0]}"


def _extract(n: int, work: Path) -> str:
    from tasks.backbones.config import BackboneConfig
    from tasks.data.config import DataConfig
    from tasks.extract.plan import ExtractConfig, plan_extraction
    from tasks.extract.stage import extract_split

    root = tiny_pngs(work / f"pngs-{n}", n)
    plans = plan_extraction(DataConfig(source="imagefolder", root=root, val_fraction=0, test_fraction=0),
                            BackboneConfig(name="resnet18", weights="none", preprocess={"resize": 32, "crop": 32}),
                            ExtractConfig(batch_size=64, num_workers=0), work / "cache" / f"x{n}")
    result = extract_split(plans["train"])
    return f"{result.rows / result.seconds:,.0f} img/s"


def _head(kind: str):
    def run(n: int, work: Path) -> str:
        from tasks.heads.configs import KNNConfig, LinearConfig, LogisticConfig
        from tasks.heads.plan import plan_heads
        from tasks.heads.stage import train_head

        train = synthetic_features(work / "features", "train", n)
        val = synthetic_features(work / "features", "val", 2000, seed=1)
        head = {"linear": LinearConfig(kind="linear", weight_decay=[1e-4], max_iter=10),
                "knn": KNNConfig(kind="knn", k=[10]),
                "logistic": LogisticConfig(kind="logistic", C=[1.0], max_iter=20)}[kind]
        os.environ["TRANSFERPIPE_HEADS_MEMORY_GB"] = "1e-6" if kind != "logistic" else "1000"
        shutil.rmtree(work / "features" / "heads", ignore_errors=True)  # a kept --work folder: train, not reuse
        result = train_head(plan_heads([head], train, val, work / "features")[0])
        return f"val acc {result.records[0].val_accuracy:.3f}"

    return run


def _evaluate(n: int, work: Path) -> str:
    from storage.records import ReportFiles
    from tasks.evaluate.metrics import classification_metrics
    from tasks.evaluate.plan import ModelReport
    from tasks.evaluate.plots import draw_plots
    from tasks.softmax import softmax

    rng = np.random.default_rng(0)
    y = rng.integers(0, 1000, n)
    scores = rng.standard_normal((n, 1000)).astype(np.float32)
    scores[np.arange(n), y] += 3.0
    metrics = classification_metrics(y, scores, softmax(scores), 1000)
    report = ModelReport(name="probe", kind="linear", layer="penultimate", shot="all", seeds=1, metrics=metrics)
    (work / "report").mkdir(exist_ok=True)
    draw_plots(ReportFiles(work / "report"), [report], [f"class{i}" for i in range(1000)])
    return f"top1 {metrics['top1']:.3f}"


def run_stage(stage: str, n: int, work: Path) -> str:
    """Do one stage at size ``n``; return a note for the table."""
    runs = {"manifest": _manifest, "shards": _shards, "plan": _plan, "grow": lambda n, w: grow(w, n),
            "extract": _extract, "linear": _head("linear"), "knn": _head("knn"), "logistic": _head("logistic"),
            "evaluate": _evaluate}
    if stage not in runs:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(BASE)}")
    return runs[stage](n, work)


def plan_config(work: Path, n: int) -> Path:
    """An experiment over the ``shards`` stage's samples (a logistic probe: every stage of a run is planned)."""
    root = tar_shards(work / f"shards-{n}", n)
    path = work / f"plan-{n}.yaml"
    path.write_text(f"name: scale\ncache_dir: {work / 'plan-cache'}\nbackbone: {{name: resnet18, weights: none}}\n"
                    f"data: {{source: webdataset, shards: {sorted(str(p) for p in root.glob('*.tar'))}, "
                    "val_fraction: 0.02, test_fraction: 0.05}\nheads: [{kind: logistic}]\n")
    return path


def grow(work: Path, n: int) -> str:
    """Extract ``n`` samples in 10 shards, then the same plus an 11th: what the second run computes."""
    from tasks.backbones.config import BackboneConfig
    from tasks.data.config import DataConfig
    from tasks.extract.plan import ExtractConfig, plan_extraction
    from tasks.extract.stage import extract_split

    root = tar_shards(work / f"grow-{n}", n * 11 // 10, per_shard=n // 10)
    shards = sorted(str(p) for p in root.glob("*.tar"))
    backbone = BackboneConfig(name="resnet18", weights="none", preprocess={"resize": 32, "crop": 32})
    cache = work / f"grow-cache-{n}"
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for listed in (shards[:-1], shards):
        data = DataConfig(source="webdataset", shards=listed, val_fraction=0, test_fraction=0)
        t0 = time.perf_counter()
        result = extract_split(plan_extraction(data, backbone, ExtractConfig(batch_size=50, num_workers=0),
                                               cache)["train"])
        runs.append((time.perf_counter() - t0, result.rows, result.forward_batches * 50))
    (t1, rows1, _), (t2, rows2, computed) = runs
    return (f"10 shards, {rows1:,} rows: {t1:.1f} s; +1 shard: {computed:,} of {rows2:,} rows computed "
            f"({computed / rows2:.1%}) in {t2:.1f} s = {t2 / t1:.2f}x the first")


def imagenet_probe(rows: int, work: Path) -> str:
    """The streaming linear probe at ImageNet's size, 1.28 M x 2048 x 1,000 classes (float16 on disk): its
    statistics pass and one L-BFGS iteration through ``fit_rows``, the code path the heads stage runs."""
    from storage.features import FeatureStore
    from tasks.heads.linear import TorchLinearHead

    train = synthetic_features(work / "features", "imagenet-train", rows, dim=2048, classes=1000)
    val = synthetic_features(work / "features", "imagenet-val", 10_000, dim=2048, classes=1000, seed=1)
    store = FeatureStore(work / "features")
    on_disk = store.rows(train, "penultimate")
    Xv = store.read(val).features["penultimate"].astype(np.float32)
    yv = store.read(val).labels
    head = TorchLinearHead(weight_decay=[1e-4], max_iter=1)
    passes, seconds = [], []
    stream = head._transformed_chunks

    def counted(*args, **kwargs):  # one call = one pass over the split
        t0 = time.perf_counter()
        yield from stream(*args, **kwargs)
        passes.append(1)
        seconds.append(time.perf_counter() - t0)

    head._transformed_chunks = counted
    t0 = time.perf_counter()
    head._fit_preprocess_rows(on_disk, 16384)
    t1 = time.perf_counter()
    head.fit_rows(on_disk, Xv, yv)
    t2 = time.perf_counter()
    gb = on_disk.rows * on_disk.dim * 2 / 2**30
    return (f"{rows:,} x 2048 float16 ({gb:.1f} GiB on disk), 1,000 classes: statistics pass {t1 - t0:.0f} s; "
            f"fit_rows with one L-BFGS iteration {t2 - t1:.0f} s = {len(passes)} loss+gradient passes of "
            f"{np.mean(seconds):.0f} s each (a pass is an epoch)")


# --------------------------------------------------------------------------- parent: rows and ratios


def measure(args: list[str]) -> tuple[float, float, float, str]:
    """(seconds in the stage, peak RSS MiB, MiB the stage added to the imports' RSS, note) of
    ``python -m benchmarks.scale --child ...`` in its own process (start-up and imports are not in the seconds)."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--child", *args], stdout=subprocess.PIPE,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {proc.returncode})")
    seconds, base, note = out.strip().splitlines()[-1].split("\t", 2)
    peak = usage.ru_maxrss / 1024
    return float(seconds), peak, peak - float(base), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--stages", nargs="+", default=list(BASE), choices=list(BASE))
    parser.add_argument("--work", type=Path, help="keep inputs here between runs (default: a temporary folder)")
    parser.add_argument("--imagenet-probe", action="store_true")
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "N", "WORK"), help=argparse.SUPPRESS)
    args = parse_args(parser, {"scales": [1], "rows": 20_000})
    # quick: a tenth of each base size (the manifest keeps its 10,000 files: 100 classes need them for a val split)
    base = {s: n if s in ("manifest", "shards", "plan") else n // 10 for s, n in BASE.items()} if args.quick else BASE

    if args.child:
        stage, n, work = args.child
        for module in ("h5py", "sklearn.linear_model", "torch"):  # start-up, not the stage: before the clock
            importlib.import_module(module)

        import resource

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        note = imagenet_probe(int(n), Path(work)) if stage == "imagenet" else run_stage(stage, int(n), Path(work))
        print(f"{time.perf_counter() - t0}\t{base}\t{note}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.imagenet_probe:
            wall, rss, _, note = measure(["imagenet", str(args.rows), str(work)])
            print(f"imagenet-size linear probe: {note}; peak RSS {rss:,.0f} MiB, {wall:.0f} s in all")
            return
        print(f"scale benchmark ({os.cpu_count()} cores); ratios to each stage's 1x row")
        print(f"{'stage':<10}{'size':>12}{'stage s':>9}{'peak RSS MiB':>14}{'stage MiB':>11}{'time ratio':>12}"
              f"{'RSS ratio':>11}  note")
        for stage in args.stages:
            first = None
            for scale in args.scales:
                n = base[stage] * scale
                make_inputs(stage, n, work)
                wall, rss, added, note = measure([stage, str(n), str(work)])
                first = first or (wall, rss)
                print(f"{stage:<10}{n:>12,}{wall:>9.1f}{rss:>14,.0f}{added:>11,.0f}{wall / first[0]:>11.1f}x"
                      f"{rss / first[1]:>10.2f}x  {note}", flush=True)


def make_inputs(stage: str, n: int, work: Path) -> None:
    """Inputs are made before the child runs, so rows measure the stage, not the test data."""
    if stage == "manifest":
        empty_files(work / f"files-{n}", n)
    elif stage == "shards":
        tar_shards(work / f"shards-{n}", n)
    elif stage == "plan":  # a first, cold plan: the warm one is measured
        subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(plan_config(work, n))], check=True,
                       stdout=subprocess.DEVNULL)
    elif stage == "grow":
        tar_shards(work / f"grow-{n}", n * 11 // 10, per_shard=n // 10)
    elif stage == "extract":
        tiny_pngs(work / f"pngs-{n}", n)
    elif stage in ("linear", "knn", "logistic"):
        synthetic_features(work / "features", "train", n)
        synthetic_features(work / "features", "val", 2000, seed=1)


if __name__ == "__main__":
    main()
