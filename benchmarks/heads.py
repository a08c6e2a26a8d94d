"""Heads on cached features versus re-running the backbone, and the logistic sweep.

Part 1, on the digits train split through a frozen resnet18 (32 px, batch 32, fp32):
  (a) the seed-tutorial approach: every epoch decodes the images and re-runs the
      frozen backbone while training only the final layer, 10 epochs (AdamW);
  (b) this pipeline: extract once to HDF5, train the same linear head for 10
      epochs (AdamW, batch 32) on the cache, plus three more heads (logistic
      sweep, kNN, ridge);
  (c) the part of (b) every later experiment pays: reading the cached features
      and fitting the heads.
  Prints the wall times, a/b and a/c.
Part 2: this project's logistic sweep (one warm-started Newton-CG path, or parallel
runs) against plain LogisticRegression loops over the same C grid on the same
features, at scikit-learn's defaults and converged: time ratios and best
validation accuracies.

    python -m benchmarks.heads [--epochs 10] [--quick] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from benchmarks import QUICK_DIGITS, parse_args
from tasks.backbones.config import BackboneConfig
from tasks.backbones.models import build
from tasks.data.config import DataConfig
from tasks.data.manifest import Manifest
from tasks.data.images import load_rgb
from tasks.extract.plan import ExtractConfig, plan_extraction
from tasks.extract.stage import extract_split
from tasks.heads.stage import load_split
from tasks.heads.neighbours import KNNHead
from tasks.heads.linear import LogisticHead, RidgeHead, TorchLinearHead

BACKBONE = BackboneConfig(name="resnet18", weights="none", preprocess={"resize": 32, "crop": 32})


def tutorial(plan, epochs: int, batch_size: int) -> float:
    """The backbone runs inside the training loop: decode → forward → linear layer, every epoch."""
    manifest = Manifest.load(plan.manifest)
    items, pre = manifest.splits["train"], plan.backbone.preprocess
    data = [(manifest.root / p, y) for p, y in items]
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=lambda b: b,
                        generator=torch.Generator().manual_seed(0))
    backbone = build(plan.backbone)
    head = torch.nn.Linear(512, len(manifest.classes))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x = torch.stack([pre(load_rgb(path)) for path, _ in batch])
            y = torch.tensor([label for _, label in batch])
            with torch.no_grad():
                feats = backbone(pre.normalize(x))["penultimate"]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(feats), y).backward()
            opt.step()
    return time.perf_counter() - started


def pipeline(plans, cache: Path, epochs: int, batch_size: int) -> tuple[float, float, dict[str, float]]:
    """Seconds of extract + heads, of reading the cached features + the heads (what every later experiment on
    them pays), and each head's val accuracy."""
    started = time.perf_counter()
    results = {split: extract_split(p) for split, p in plans.items()}
    extracted = time.perf_counter()
    X, y = load_split(cache, results["train"].key, "penultimate")
    Xv, yv = load_split(cache, results["val"].key, "penultimate")
    heads = {
        f"linear (adamw, {epochs} epochs)": TorchLinearHead(weight_decay=(0.0,), optimizer="adamw", epochs=epochs,
                                                     batch_size=batch_size, device="cpu"),
        "logistic (13-point C sweep)": LogisticHead(),
        "knn (6 k values)": KNNHead(device="cpu"),
        "ridge (7 alphas)": RidgeHead(),
    }
    accuracy = {name: head.fit(X, y, Xv, yv).val_accuracy_ for name, head in heads.items()}
    done = time.perf_counter()
    return done - started, done - extracted, accuracy


def sweep_versus_loop(cache: Path, train_key: str, val_key: str) -> tuple[str, dict[str, tuple[float, float, float]]]:
    """The sweep against plain loops of cold ``LogisticRegression`` fits over the same grid on the head's own
    preprocessed features: at scikit-learn's defaults (lbfgs, tol 1e-4: what a user writes) and converged as the
    sweep's kept model is (tol 1e-8). Its title and, per line, the time, the best val accuracy and its C."""
    X, y = load_split(cache, train_key, "penultimate")
    Xv, yv = load_split(cache, val_key, "penultimate")
    grid = tuple(float(c) for c in np.logspace(-6, 6, 13))
    runs = {}
    for n_jobs in (1, -1):
        started = time.perf_counter()
        head = LogisticHead(C=grid, n_jobs=n_jobs).fit(X, y, Xv, yv)
        runs[n_jobs] = (time.perf_counter() - started, head.val_accuracy_, head.best_param_)
    Xs, Xvs = head._transform(X), head._transform(Xv)
    loops = {}
    for label, tol in (("defaults, tol 1e-4", 1e-4), ("converged, tol 1e-8", 1e-8)):
        started = time.perf_counter()
        scores = [LogisticRegression(C=c, tol=tol, max_iter=10_000).fit(Xs, y).score(Xvs, yv) for c in grid]
        loops[label] = (time.perf_counter() - started, max(scores), grid[int(np.argmax(scores))])
    lines = {f"plain LogisticRegression loop, {k}": v for k, v in loops.items()}
    lines.update({f"sweep, {'one warm path (default)' if j == 1 else 'parallel runs, one per core'}": v
                  for j, v in runs.items()})
    return f"logistic sweep, {len(grid)} C values on {X.shape[0]} x {X.shape[1]} features", lines


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")  # ill-conditioned ridge at small alpha: expected
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--markdown", action="store_true", help="the tables docs/performance.md holds")
    args = parse_args(parser, {"epochs": 2})
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        data = DataConfig(**(QUICK_DIGITS if args.quick else {"source": "digits"}))
        plans = plan_extraction(data, BACKBONE, ExtractConfig(dtype="float32", num_workers=0), cache)
        train_plan = plans["train"]
        t_a = tutorial(train_plan, args.epochs, args.batch_size)
        t_b, t_c, accuracy = pipeline(plans, cache, args.epochs, args.batch_size)
        n = len(Manifest.load(train_plan.manifest).splits["train"])
        keys = {split: p.key for split, p in plans.items()}
        title, sweep = sweep_versus_loop(cache, keys["train"], keys["val"])
    report = (print_markdown if args.markdown else print_text)
    report(f"digits ({n} train images), resnet18 frozen @ 32 px, {args.epochs} epochs, batch {args.batch_size}",
           t_a, t_b, t_c, accuracy, title, sweep)


def print_text(setting: str, t_a: float, t_b: float, t_c: float, accuracy: dict[str, float], title: str,
               sweep: dict[str, tuple[float, float, float]]) -> None:
    print(f"heads benchmark: {setting}")
    print(f"  (a) tutorial: backbone re-run every epoch, linear layer only   {t_a:7.2f} s")
    print(f"  (b) extract once + the same linear head + 3 more heads          {t_b:7.2f} s")
    print(f"  (c) of which a later experiment: read the cache + the 4 heads   {t_c:7.2f} s")
    print(f"  a/b = {t_a / t_b:.2f}   a/c = {t_a / t_c:.2f}   (val accuracy of (b)'s heads: "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + ")")
    t_plain = next(iter(sweep.values()))[0]
    print(f"{title} (ratios: plain loop at defaults / this line):")
    for label, (t, acc, best) in sweep.items():
        print(f"  {label:44s} {t:6.2f} s   best val acc {acc:.4f} at C={best:<8g} {t_plain / t:5.2f}x")


def print_markdown(setting: str, t_a: float, t_b: float, t_c: float, accuracy: dict[str, float], title: str,
                   sweep: dict[str, tuple[float, float, float]]) -> None:
    """The tables docs/performance.md holds (``python -m benchmarks.readme --only heads``), with the date and
    the machine's load they were measured at."""
    import datetime
    import platform

    load = os.getloadavg()[0]
    print(f"**{setting}; measured {datetime.date.today()} on {os.cpu_count()} cores ({platform.machine()}, "
          f"load {load:.1f})**")
    print("| approach | seconds | ratio |")
    print("|---|---|---|")
    print(f"| (a) the backbone re-run every epoch, linear layer only | {t_a:.2f} | 1.00 |")
    print(f"| (b) extract once + the same linear head + 3 more heads | {t_b:.2f} | {t_a / t_b:.2f}x |")
    print(f"| (c) of (b), what a later experiment pays: read the cached features + the 4 heads | {t_c:.2f} | "
          f"{t_a / t_c:.2f}x |")
    t_plain = next(iter(sweep.values()))[0]
    print(f"**{title}: ratio to the plain loop at scikit-learn's defaults**")
    print("| run | seconds | best val acc (C) | ratio |")
    print("|---|---|---|---|")
    for label, (t, acc, best) in sweep.items():
        print(f"| {label} | {t:.2f} | {acc:.4f} ({best:g}) | {t_plain / t:.2f}x |")


if __name__ == "__main__":
    main()
