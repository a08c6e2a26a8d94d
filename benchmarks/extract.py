"""Extraction throughput: the full stage against a bare forward loop, same images, same run.

(a) bare: ``model(x)`` over tensors decoded and transformed beforehand (the ceiling);
(b) stage: ``tasks.extract.extract_split`` — decode → transform → forward → HDF5,
    with ``num_workers`` 0 and auto.

Prints images/s and the ratio b/a (1.0 = the stage costs nothing beyond the model).
With several ``--backbone`` values, each backbone's figures are also given as a
ratio to the first one's, measured in the same run. ``efficientnet-lite0`` is the
ImageNet-trained EfficientNet-Lite0 through the python source (``transferpipe[demo]``);
other names are torchvision models. Not a test: nothing here asserts a time.

    python -m benchmarks.extract [--images 512] [--size 256] [--backbone resnet18 [--backbone efficientnet-lite0]]
                                 [--crop 224] [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import parse_args
from tasks.backbones import BackboneConfig
from tasks.models import build
from tasks.data import DataConfig, Manifest, load_rgb
from tasks.extract import ExtractConfig, extract_split, plan_extraction


def make_images(root: Path, n: int, size: int, classes: int = 4) -> None:
    """JPEGs with smooth structure (they compress and decode like photos, not like noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        f = rng.uniform(2, 8, 3)
        img = np.stack([np.sin(f[k] * (xx + yy * (c + 1)) + k) for k in range(3)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
        path = root / f"class{c}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)


def bare_loop(plan, batch_size: int) -> float:
    manifest = Manifest.load(plan.manifest)
    pre = plan.backbone.preprocess
    xs = torch.stack([pre(load_rgb(manifest.root / p)) for p, _ in manifest.splits["train"]])
    model = build(plan.backbone)
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(xs), batch_size):
            model(pre.normalize(xs[i : i + batch_size]))
    return len(xs) / (time.perf_counter() - started)


def stage(cfg_kwargs: dict, cache: Path, workers: int | str) -> float:
    data, backbone, extract = cfg_kwargs["data"], cfg_kwargs["backbone"], cfg_kwargs["extract"]
    extract = extract.model_copy(update={"num_workers": workers})
    plan = plan_extraction(data, backbone, extract, cache)["train"]
    result = extract_split(plan)
    assert not result.cache_hit
    return result.rows / result.seconds


def backbone_config(name: str, crop: int) -> BackboneConfig:
    preprocess = {"resize": crop * 8 // 7, "crop": crop}
    if name == "efficientnet-lite0":
        from tasks.zoo import EFFICIENTNET_LITE0, efficientnet_lite0_weights

        return BackboneConfig(**{**EFFICIENTNET_LITE0, "preprocess": {**EFFICIENTNET_LITE0["preprocess"], **preprocess}},
                              weights=efficientnet_lite0_weights())
    return BackboneConfig(name=name, weights="none", preprocess=preprocess)


def measure(images: Path, tmp: Path, backbone: BackboneConfig, batch_size: int) -> tuple[float, float, float]:
    cfg = {
        "data": DataConfig(source="imagefolder", root=images, val_fraction=0, test_fraction=0),
        "backbone": backbone,
        "extract": ExtractConfig(batch_size=batch_size),
    }
    plan = next(iter(plan_extraction(cfg["data"], cfg["backbone"], cfg["extract"], tmp / "c0").values()))
    stage(cfg, tmp / "warmup", 0)  # first-touch costs (allocator, page cache) paid outside the timings
    return bare_loop(plan, batch_size), stage(cfg, tmp / "c1", 0), stage(cfg, tmp / "c2", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--backbone", action="append", help="repeat to compare (default resnet18)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parse_args(parser, {"images": 32, "size": 64, "crop": 32, "batch_size": 16})

    names = args.backbone or ["resnet18"]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images, args.size)
        for i, name in enumerate(names):
            figures[name] = measure(tmp / "images", tmp / str(i), backbone_config(name, args.crop), args.batch_size)

    print(f"extract benchmark: {args.images} JPEGs {args.size}px @ {args.crop}px, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads, device cpu")
    first = figures[names[0]]
    for name, (a, b0, b_auto) in figures.items():
        vs = f"   vs {names[0]}: {b_auto / first[2]:.2f}" if name != names[0] else ""
        print(f"{name}")
        print(f"  (a) bare model(x) on pre-decoded tensors   {a:8.1f} img/s   1.00")
        print(f"  (b) full stage, num_workers=0              {b0:8.1f} img/s   {b0 / a:.2f}  (b/a)")
        print(f"  (b) full stage, num_workers=auto           {b_auto:8.1f} img/s   {b_auto / a:.2f}  (b/a){vs}")


if __name__ == "__main__":
    main()
