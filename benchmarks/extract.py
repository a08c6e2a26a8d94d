"""Extraction throughput: the full stage against a bare forward loop, same images, same run.

(a) bare: ``model(x)`` over tensors decoded and transformed beforehand (the ceiling);
(b) stage: ``tasks.extract.stage.extract_split`` — decode → transform → forward → HDF5,
    with ``num_workers`` 0 and auto.

Prints images/s and the ratio b/a (1.0 = the stage costs nothing beyond the model).
Then (c): the same images read from the other dataset sources, the stage with
``num_workers=auto`` at each ``--source-crops`` size, as a ratio to the folder:
WebDataset tar shards and a Parquet table of the bytes (a decode-bound size,
64 px, and a compute-bound one, 224 px).
With several ``--backbone`` values, each backbone's figures are also given as a
ratio to the first one's, measured in the same run. ``efficientnet-lite0`` is the
ImageNet-trained EfficientNet-Lite0 through the python source (``transferpipe[demo]``);
other names are torchvision models. Not a test: nothing here asserts a time.

    python -m benchmarks.extract [--images 512] [--size 256] [--backbone resnet18 [--backbone efficientnet-lite0]]
                                 [--crop 224] [--source-crops 64,224] [--quick]
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
from tasks.backbones.config import BackboneConfig
from tasks.backbones.models import build
from tasks.data.config import DataConfig
from tasks.data.manifest import Manifest
from tasks.data.images import load_rgb
from tasks.extract.plan import ExtractConfig, plan_extraction
from tasks.extract.stage import extract_split


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


def as_sources(images: Path, out: Path) -> dict[str, DataConfig]:
    """The folder, and the same JPEGs as WebDataset shards (1,000 samples each) and as a Parquet table."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(images.glob("*/*.jpg"))
    (out / "shards").mkdir(parents=True)
    for n in range(0, len(paths), 1000):
        with tarfile.open(out / "shards" / f"train-{n // 1000:04d}.tar", "w") as tar:
            for path in paths[n : n + 1000]:
                key = f"{path.parent.name}_{path.stem}"
                for name, data in ((f"{key}.jpg", path.read_bytes()), (f"{key}.cls", path.parent.name.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    table = pa.table({"image": [p.read_bytes() for p in paths], "label": [p.parent.name for p in paths]})
    pq.write_table(table, out / "images.parquet", row_group_size=256)
    split = {"val_fraction": 0, "test_fraction": 0}
    return {
        "folder": DataConfig(source="imagefolder", root=images, **split),
        "webdataset": DataConfig(source="webdataset", shards=sorted(str(p) for p in (out / "shards").glob("*.tar")),
                                 **split),
        "parquet": DataConfig(source="table", path=str(out / "images.parquet"), **split),
    }


def compare_sources(images: Path, tmp: Path, name: str, crops: list[int], batch_size: int) -> dict[int, dict]:
    """img/s of the stage (num_workers=auto) per source and crop, all in this run."""
    sources = as_sources(images, tmp / "sources")
    out: dict[int, dict] = {}
    for crop in crops:
        backbone = backbone_config(name, crop)
        out[crop] = {}
        for label, data in sources.items():
            cfg = {"data": data, "backbone": backbone, "extract": ExtractConfig(batch_size=batch_size)}
            out[crop][label] = stage(cfg, tmp / f"src-{crop}-{label}", "auto")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--backbone", action="append", help="repeat to compare (default resnet18)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--source-crops", default="64,224", help="crops of the sources comparison (c); '' skips it")
    args = parse_args(parser, {"images": 32, "size": 64, "crop": 32, "batch_size": 16, "source_crops": "32"})

    names = args.backbone or ["resnet18"]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images, args.size)
        for i, name in enumerate(names):
            figures[name] = measure(tmp / "images", tmp / str(i), backbone_config(name, args.crop), args.batch_size)
        crops = [int(c) for c in args.source_crops.split(",") if c]
        by_source = compare_sources(tmp / "images", tmp, names[0], crops, args.batch_size) if crops else {}

    print(f"extract benchmark: {args.images} JPEGs {args.size}px @ {args.crop}px, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads, device cpu")
    first = figures[names[0]]
    for name, (a, b0, b_auto) in figures.items():
        vs = f"   vs {names[0]}: {b_auto / first[2]:.2f}" if name != names[0] else ""
        print(f"{name}")
        print(f"  (a) bare model(x) on pre-decoded tensors   {a:8.1f} img/s   1.00")
        print(f"  (b) full stage, num_workers=0              {b0:8.1f} img/s   {b0 / a:.2f}  (b/a)")
        print(f"  (b) full stage, num_workers=auto           {b_auto:8.1f} img/s   {b_auto / a:.2f}  (b/a){vs}")
    for crop, rates in by_source.items():
        print(f"(c) {names[0]} at {crop}px, num_workers=auto, by dataset source")
        for label, rate in rates.items():
            print(f"  {label:<12}{rate:8.1f} img/s   {rate / rates['folder']:.2f}  (vs folder)")


if __name__ == "__main__":
    main()
