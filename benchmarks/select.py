"""Scoring candidates versus training the probe for each, on the same cached features, same run.

For N candidate backbones (random initialisations of resnet18 with different
seeds, on the digits at 32 px) this times LogME and H-score against the
logistic probe (13-point C sweep on val) that they stand in for, and prints
the ratios. Not a test.

    python -m benchmarks.select [--candidates 4] [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks import QUICK_DIGITS, parse_args
from tasks.backbones.config import BackboneConfig
from tasks.data.config import DataConfig
from tasks.extract.plan import ExtractConfig, plan_extraction
from tasks.extract.stage import extract_split
from tasks.heads.stage import load_split
from tasks.heads.linear import LogisticHead
from tasks.select.scores import h_score, logme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=4)
    args = parse_args(parser, {"candidates": 2})
    t_logme = t_h = t_probe = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for seed in range(args.candidates):
            backbone = BackboneConfig(name="resnet18", weights="none", init_seed=seed, preprocess={"resize": 32, "crop": 32})
            plans = plan_extraction(DataConfig(**(QUICK_DIGITS if args.quick else {"source": "digits"})), backbone, ExtractConfig(), cache)
            X, y = load_split(cache, extract_split(plans["train"]).key, "penultimate")
            Xv, yv = load_split(cache, extract_split(plans["val"]).key, "penultimate")
            started = time.perf_counter()
            logme(X, y)
            t_logme += time.perf_counter() - started
            started = time.perf_counter()
            h_score(X, y)
            t_h += time.perf_counter() - started
            started = time.perf_counter()
            LogisticHead().fit(X, y, Xv, yv)
            t_probe += time.perf_counter() - started
    print(f"select benchmark: {args.candidates} candidates, digits train {X.shape[0]} x {X.shape[1]} features")
    print(f"  logistic probe (13-point C sweep)  {t_probe:7.2f} s   1.00")
    print(f"  LogME                              {t_logme:7.2f} s   probe/LogME {t_probe / t_logme:6.1f}")
    print(f"  H-score                            {t_h:7.2f} s   probe/H-score {t_probe / t_h:6.1f}")


if __name__ == "__main__":
    main()
