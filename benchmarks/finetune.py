"""Fine-tuning throughput: one epoch with only ``layer4`` unfrozen versus everything, same run.

Frozen blocks hold no parameter that needs a gradient, so autograd neither
records them nor runs their backward: the partial epoch should be well
faster. Prints images/s of each and the ratio. Not a test.

    python benchmarks/finetune.py [--images 512] [--crop 96] [--batch-size 32] [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks import parse_args
from benchmarks.extract import make_images
from tasks.backbones.config import BackboneConfig, resolve
from tasks.data.config import DataConfig
from tasks.extract.plan import ExtractConfig, plan_extraction
from tasks.finetune.plan import FinetuneConfig, plan_finetune
from tasks.finetune.stage import finetune


def one_epoch(manifest: Path, cache: Path, args, **unfreeze) -> float:
    cfg = FinetuneConfig(enabled=True, epochs=1, batch_size=args.batch_size, init_head="random", augment="none",
                         num_workers=0, early_stopping=None, **unfreeze)
    spec = resolve(BackboneConfig(name=args.backbone, weights="none", preprocess={"resize": args.crop, "crop": args.crop}))
    plan = plan_finetune(cfg, spec, manifest, cache, {}, [])
    return finetune(plan).history[0].images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    args = parse_args(parser, {"images": 32, "crop": 32, "batch_size": 16})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images, 128)
        data = DataConfig(source="imagefolder", root=tmp / "images", val_fraction=0.1, test_fraction=0)
        backbone = BackboneConfig(name=args.backbone, weights="none")
        manifest = plan_extraction(data, backbone, ExtractConfig(), tmp / "c")["train"].manifest
        one_epoch(manifest, tmp / "warmup", args, unfreeze=["layer4"])  # first-touch costs outside the timings
        partial = one_epoch(manifest, tmp / "partial", args, unfreeze=["layer4"])
        full = one_epoch(manifest, tmp / "full", args, unfreeze="all")
    print(f"finetune benchmark: {args.images} images @ {args.crop} px, {args.backbone}, batch {args.batch_size}, cpu")
    print(f"  all layers unfrozen      {full:7.1f} img/s   1.00")
    print(f"  only layer4 unfrozen     {partial:7.1f} img/s   {partial / full:.2f}  (layer4 / all)")


if __name__ == "__main__":
    main()
