"""``transferpipe predict`` as a user feels it: each run a fresh process from the shell (start-up included).

1. Cold: ``transferpipe predict CONFIG --data NEW`` on N new images (the experiment already ran) against a
   plain script doing the same work by hand (decode, torch forward, the same saved head, a Parquet file):
   seconds as a ratio to the plain script.
2. Grown: 10% more images land and ``predict`` runs again: rows that went through the backbone and seconds,
   as ratios to the cold run (goal: 0.10 of the rows, at most 0.15 of the time).
3. Memory: peak RSS of a cold ``predict`` on 10x the images against 1x (goal at most 1.1: rows stream).

    python -m benchmarks.predict [--images 5000] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks import QUICK_DIGITS, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"name": "bench-predict", "data": {"source": "digits"}, "extract": {"batch_size": 256, "num_workers": 0},
          "backbone": {"name": "resnet18", "weights": "none", "preprocess": {"resize": 32, "crop": 32}},
          "heads": [{"kind": "logistic", "C": [1.0]}], "retries": 0}


def make_images(root: Path, start: int, count: int) -> None:
    """Second-scanner renderings of the digits, each one a new image (its own noise seed)."""
    from sklearn.datasets import load_digits

    from tasks.data.synthetic import _render

    pixels = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    for i in range(start, start + count):
        path = root / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        _render(pixels[i % len(pixels)], "scanner2", seed=i).save(path)


def timed(args: list[str], home: Path) -> tuple[float, int, str]:
    """Seconds, peak RSS (KiB) and stdout of one command in a fresh process (RSS of that process alone)."""
    probe = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(done.stdout); print(done.stderr[-2000:], file=sys.stderr); "
             "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, capture_output=True, text=True,
                          env={"PREFECT_HOME": str(home), "PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    rss = int(done.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    return seconds, rss, done.stdout


def plain(config: Path, images: Path, out: Path) -> None:
    """The hand-written baseline: every image decoded, the backbone's forward pass, the saved head, Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from flows.config import load_config
    from storage.layout import CacheLayout
    from tasks.backbones.config import resolve
    from tasks.backbones.models import build
    from tasks.data.images import load_rgb
    from tasks.heads.stage import load_head

    cfg = load_config(config)
    spec = resolve(cfg.backbone, cfg.cache_dir)
    model, pre = build(spec), spec.preprocess
    runs = sorted(CacheLayout(cfg.cache_dir).reports(cfg.name).glob("*/result.json"))
    head_key = json.loads(runs[-1].read_text())["models"][0]["artifacts"][0]
    head = load_head(cfg.cache_dir, head_key)
    paths = sorted(str(p) for p in images.rglob("*.png"))
    rows = []
    with torch.inference_mode():
        for start in range(0, len(paths), 256):
            batch = torch.stack([pre(load_rgb(Path(p))) for p in paths[start:start + 256]])
            probs = head.predict_proba(model(pre.normalize(batch))["penultimate"].float().numpy())
            rows += [(p, int(r.argmax()), float(r.max())) for p, r in zip(paths[start:start + 256], probs)]
    pq.write_table(pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows],
                             "probability": [r[2] for r in rows]}), out)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_extracted(cache: Path, before: set[Path]) -> int:
    import h5py

    total = 0
    for path in set((cache / "features" / "pieces").glob("*.h5")) - before:
        with h5py.File(path, "r") as fh:  # rows a grown piece copied from the one it grew from: no forward pass
            total += len(fh["labels"]) - int(fh.attrs.get("rows_copied", 0))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="N new images (the memory run scores 10 N)")
    args = parse_args(parser, {"images": 60})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = {**CONFIG, "cache_dir": str(tmp / "cache"), **({"data": QUICK_DIGITS} if args.quick else {})}
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump(raw))
        cli = [sys.executable, "-m", "flows.cli"]
        timed([*cli, "run", str(config)], tmp / "home")  # the experiment: features, the head, the evaluation
        new, big = tmp / "new", tmp / "big"
        make_images(new, 0, args.images)
        make_images(big, 0, 10 * args.images)
        plain_s, plain_rss, _ = timed([sys.executable, "-m", "benchmarks.predict", "--plain", str(config), str(new),
                                       str(tmp / "plain.parquet")], tmp / "home")
        before = set((tmp / "cache" / "features" / "pieces").glob("*.h5"))
        cold_s, cold_rss, _ = timed([*cli, "predict", str(config), "--data", str(new)], tmp / "home")
        cold_rows = rows_extracted(tmp / "cache", before)
        make_images(new, args.images, max(1, args.images // 10))
        before = set((tmp / "cache" / "features" / "pieces").glob("*.h5"))
        grown_s, _, _ = timed([*cli, "predict", str(config), "--data", str(new)], tmp / "home")
        grown_rows = rows_extracted(tmp / "cache", before)
        big_s, big_rss, _ = timed([*cli, "predict", str(config), "--data", str(big)], tmp / "home")
        timed([*cli, "server", "start", "--port", str(free_port())], tmp / "home")  # what the README advises
        try:
            make_images(new, args.images + max(1, args.images // 10), max(1, args.images // 10))
            served_s, _, _ = timed([*cli, "predict", str(config), "--data", str(new)], tmp / "home")
        finally:
            timed([*cli, "server", "stop"], tmp / "home")
    print(f"predict on {args.images:,} new images (digits, resnet18 at 32 px, logistic head), each a fresh process")
    print("| run | seconds | ratio | rows through the backbone | peak RSS |\n|---|---|---|---|---|")
    print(f"| plain script (decode, forward, head, Parquet) | {plain_s:.1f} | 1.00 | {args.images:,} | "
          f"{plain_rss / 1024:.0f} MiB |")
    print(f"| transferpipe predict, cold | {cold_s:.1f} | {cold_s / plain_s:.2f} | {cold_rows:,} | {cold_rss / 1024:.0f} MiB |")
    print(f"| after 10% more images land | {grown_s:.1f} | {grown_s / cold_s:.2f} of cold | {grown_rows:,} "
          f"({grown_rows / max(cold_rows, 1):.2f} of cold) | |")
    print(f"| cold on 10x the images | {big_s:.1f} | {big_s / cold_s:.2f} of cold | {10 * args.images:,} | "
          f"{big_rss / 1024:.0f} MiB ({big_rss / cold_rss:.2f} of 1x) |")
    print(f"| 10% more again, a server running (`transferpipe server start`) | {served_s:.1f} | "
          f"{served_s / cold_s:.2f} of cold | | |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--plain":
        plain(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
