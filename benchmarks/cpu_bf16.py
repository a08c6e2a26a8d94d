"""bf16 autocast on the CPU (``extract.cpu_bf16``) against fp32: the extraction stage's speed and the probe's
test top-1 on the features each writes.

Rows: (1) digits, resnet18 with random weights at 32 px; (2) the demo's second-scanner digits through the
demo's pretrained source checkpoint (``--weights``: the ``best.pt`` path ``transferpipe demo`` prints; left out
without it); (3) the digits 0 and 1 (360 images) through a resnet50 at 224 px (speed only; not in ``--quick``). Each: images/s of the stage
(decode, forward, HDF5) in fp32 and bf16, the ratio, and for (1) and (2) the logistic probe's test top-1 (the
heads stage's sweep, C chosen on val) on each one's features and the difference in points. Whether this CPU
has bf16 instructions (AVX512-BF16 or AMX) is printed first: without them bf16 is emulated and slower.

    python -m benchmarks.cpu_bf16 [--weights PATH] [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks import QUICK_DIGITS, parse_args
from tasks.backbones.config import BackboneConfig
from tasks.data.config import DataConfig
from tasks.extract.plan import ExtractConfig, plan_extraction
from tasks.extract.stage import extract_split
from tasks.heads.linear import LogisticHead
from tasks.heads.stage import load_split
from tasks.machine import cpu_description, cpu_has_fast_bf16

SMALL = {"resize": 32, "crop": 32}


def stage(data: DataConfig, backbone: BackboneConfig, bf16: bool, cache: Path, probe: bool) -> tuple[float, float | None]:
    """Images/s of extracting every split, and the probe's test top-1 on the features (None without ``probe``)."""
    extract = ExtractConfig(dtype="float32", num_workers=0, device="cpu", cpu_bf16=bf16)
    plans = plan_extraction(data, backbone, extract, cache)
    started = time.perf_counter()
    results = {split: extract_split(plan) for split, plan in plans.items()}
    rate = sum(r.rows for r in results.values()) / (time.perf_counter() - started)
    if not probe:
        return rate, None
    (X, y), (Xv, yv), (Xt, yt) = (load_split(cache, results[s].key, "penultimate") for s in ("train", "val", "test"))
    return rate, float((LogisticHead().fit(X, y, Xv, yv).predict(Xt) == yt).mean())


def main() -> None:
    warnings.filterwarnings("ignore", module="sklearn")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="the demo's source checkpoint (best.pt)")
    args = parse_args(parser, {})
    digits = QUICK_DIGITS if args.quick else {"source": "digits"}
    rows = [("digits, resnet18 random weights, 32 px", DataConfig(**digits),
             BackboneConfig(name="resnet18", weights="none", preprocess=SMALL), True)]
    if args.weights:
        rows.append(("demo: second scanner, the source checkpoint, 32 px",
                     DataConfig(source="digits", digits={"half": "second", "style": "scanner2"}, val_fraction=0.1,
                                test_fraction=0.2),
                     BackboneConfig(name="resnet18", weights=str(args.weights), preprocess=SMALL), True))
    if not args.quick:
        rows.append(("digits 0 and 1, resnet50 random weights, 224 px", DataConfig(source="digits", digits={"classes": [0, 1]}),
                     BackboneConfig(name="resnet50", weights="none", preprocess={"resize": 224, "crop": 224}), False))
    print(f"cpu_bf16 benchmark on {cpu_description()}; bf16 instructions: "
          f"{'yes' if cpu_has_fast_bf16() else 'no (emulated: expect it slower)'}")
    print("| features | fp32 img/s | bf16 img/s | bf16 / fp32 | probe top-1 fp32 | bf16 | difference |")
    print("|---|---|---|---|---|---|---|")
    for label, data, backbone, probe in rows:
        with tempfile.TemporaryDirectory() as tmp:
            (r32, a32), (r16, a16) = (stage(data, backbone, bf16, Path(tmp), probe) for bf16 in (False, True))
        accuracy = ("| - | - | -" if a32 is None else
                    f"| {a32:.4f} | {a16:.4f} | {100 * (a16 - a32):+.2f} points")
        print(f"| {label} | {r32:.0f} | {r16:.0f} | {r16 / r32:.2f}x {accuracy} |")


if __name__ == "__main__":
    main()
