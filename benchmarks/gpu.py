"""One benchmark for a lent GPU that runs on any device: extraction, decoding, heads, kNN and fine-tuning.

    python -m benchmarks.gpu [--device auto|cpu|cuda|cuda:N] [--quick] [--compile | --no-compile]

It prints one table in groups; each group's first row is its baseline, measured in the same run, and
every row gives its throughput, its ratio to that baseline and the peak memory it took (on CUDA the
device's ``max_memory_allocated`` during the row; on the CPU the process's peak RSS so far, which only
grows). The groups (docs/GPU.md says what each row means and the targets):

1. extraction from uint8 tensors already on the device, per backbone: fp32; AMP (bf16 where
   supported); channels_last; both; ``torch.compile`` with both (``--compile``, default on a GPU);
2. extraction from JPEG files: a bare loop (PIL decode in DataLoader workers, ``model(x)``), the stage
   (``tasks.extract.stage.extract_split``: the same decode, and the HDF5 store), and ``torchvision.io.decode_jpeg``
   batched on the device (nvJPEG on CUDA; libjpeg-turbo in the main process on the CPU);
3. heads on synthetic cached features: scikit-learn's logistic sweep on the CPU (the baseline), the torch
   linear head's sweep on the device, and the same head streaming the split from HDF5 in chunks;
4. kNN search: numpy on the CPU (the baseline), torch on the device;
5. one fine-tuning epoch (the stage, ``layer4`` unfrozen): AMP off, AMP on (on the CPU both are fp32:
   the stage autocasts on CUDA only).

Imports no Prefect: the stages are plain functions, so it runs on a machine that has only torch, h5py,
scikit-learn and pydantic (docs/GPU.md lists the wheels). ``--quick`` is CI's smoke run on the CPU:
tiny inputs, the same code path, well under a minute; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import parse_args
from benchmarks.extract import make_images
from tasks.backbones.config import BackboneConfig, resolve
from tasks.backbones.models import build


@dataclass(frozen=True)
class Sizes:
    """What one run measures on: full on a GPU, small on a CPU, tiny with ``--quick``."""

    models: tuple[str, ...]
    batch: int  # extraction from tensors
    crop: int
    repeat: int
    jpegs: int  # extraction from files
    jpeg_side: int
    jpeg_crop: int
    head_rows: int  # heads: rows x dim x classes
    head_dim: int
    head_classes: int
    queries: int
    ft_images: int  # fine-tuning epoch
    ft_crop: int
    ft_batch: int


FULL_GPU = Sizes(("resnet18", "resnet50"), 256, 224, 20, 4096, 320, 224, 50_000, 2048, 100, 10_000, 2048, 224, 128)
FULL_CPU = Sizes(("resnet18", "resnet50"), 32, 224, 3, 256, 256, 224, 20_000, 512, 100, 2_000, 128, 128, 32)
QUICK = Sizes(("resnet18",), 8, 64, 2, 48, 80, 64, 2_000, 64, 10, 200, 32, 32, 16)


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Row:
    label: str
    rate: float  # units per second
    unit: str
    peak: float  # MiB
    note: str = ""


def measure(label: str, unit: str, count: int, fn: Callable[[], object], device: torch.device,
            repeat: int = 1, warmup: bool = True, note: str = "") -> Row:
    """``count`` units per call of ``fn``: the mean rate over ``repeat`` calls after one warm-up call."""
    if warmup:
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return Row(label, count * repeat / (time.perf_counter() - t0), unit, peak_mib(device), note)


def amp_dtype(device: torch.device) -> torch.dtype:
    """What AMP computes in here: bf16 where supported (any CPU, Ampere and newer GPUs), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# --------------------------------------------------------------------------- 1. extraction from tensors


def tensor_rows(name: str, device: torch.device, s: Sizes, compile_too: bool) -> list[Row]:
    """``model(x)`` from uint8 tensors already on the device, as the stage's forward pass does it."""
    spec = resolve(BackboneConfig(name=name, weights="none", preprocess={"resize": s.crop, "crop": s.crop}), None)
    x = torch.randint(0, 256, (s.batch, 3, s.crop, s.crop), dtype=torch.uint8, device=device)
    half = amp_dtype(device)
    half_name = str(half).removeprefix("torch.")

    def forward(model, channels_last: bool, dtype):
        def step():
            with torch.inference_mode(), autocast(device, dtype):
                inp = spec.preprocess.normalize(x)
                if channels_last:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                return model(inp)
        return step

    plain = build(spec).to(device).eval()
    cl = build(spec).to(device).eval().to(memory_format=torch.channels_last)
    variants = [("fp32", plain, False, None), (f"AMP {half_name}", plain, False, half),
                ("channels_last", cl, True, None), (f"channels_last + AMP {half_name}", cl, True, half)]
    if compile_too:
        variants.append((f"compile + channels_last + AMP {half_name}", torch.compile(cl), True, half))
    rows = []
    for label, model, channels_last, dtype in variants:
        step = forward(model, channels_last, dtype)
        if "compile" in label:
            t0 = time.perf_counter()
            step()  # compiles
            note = f"compiled in {time.perf_counter() - t0:.0f} s"
        else:
            note = ""
        rows.append(measure(f"{name} {label}", "img", s.batch, step, device, s.repeat, note=note))
    return rows


# --------------------------------------------------------------------------- 2. extraction from JPEG files


class _Files(torch.utils.data.Dataset):
    """Image files decoded with PIL and preprocessed, one per item (the bare loop's dataset)."""

    def __init__(self, paths: list[Path], pre) -> None:
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from tasks.data.images import load_rgb

        return self.pre(load_rgb(self.paths[i]))


def _pil_loader(paths: list[Path], pre, batch: int, workers: int, device: torch.device):
    from torch.utils.data import DataLoader

    return DataLoader(_Files(paths, pre), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)


def jpeg_rows(images: Path, tmp: Path, device: torch.device, s: Sizes) -> list[Row]:
    """The same JPEGs three ways: PIL in DataLoader workers + a bare forward loop; the stage; decode on the device."""
    from tasks.data.config import DataConfig
    from tasks.data.manifest import Manifest
    from tasks.data.images import num_workers_for
    from tasks.extract.gpu_decode import decode_jpegs, read_files, to_batch
    from tasks.extract.plan import ExtractConfig, plan_extraction
    from tasks.extract.stage import extract_split
    from tasks.machine import autocast_dtype, forward_precision

    backbone = BackboneConfig(name=s.models[-1], weights="none",
                              preprocess={"resize": s.jpeg_crop * 8 // 7, "crop": s.jpeg_crop})
    extract = ExtractConfig(device=str(device), batch_size=s.batch)
    data = DataConfig(source="imagefolder", root=images, val_fraction=0, test_fraction=0)
    plan = plan_extraction(data, backbone, extract, tmp / "plan")["train"]
    spec, pre = plan.backbone, plan.backbone.preprocess
    manifest = Manifest.load(plan.manifest)
    paths = [manifest.root / p for p, _ in manifest.splits["train"]]
    precision = forward_precision(str(device), extract.amp)
    dtype = autocast_dtype(precision, device)  # the stage's own: fp32 on the CPU
    channels_last = extract.channels_last  # as the stage: on any device
    model = build(spec).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = num_workers_for(extract.num_workers, -(-len(paths) // s.batch))

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(device, dtype):
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            model(pre.normalize(x))

    loader = _pil_loader(paths, pre, s.batch, workers, device)

    def bare():
        for x in loader:
            forward(x)

    runs = iter(range(1000))

    def stage():
        result = extract_split(plan_extraction(data, backbone, extract, tmp / f"stage{next(runs)}")["train"])
        assert not result.cache_hit

    def on_device():
        for i in range(0, len(paths), s.batch):
            forward(to_batch(decode_jpegs(read_files(paths[i : i + s.batch]), device), pre))

    where = "nvJPEG" if device.type == "cuda" else "libjpeg-turbo, main process"
    return [
        measure(f"JPEG: PIL in {workers} worker{'s' * (workers != 1)} + bare loop", "img", len(paths), bare, device,
                note=f"{s.jpeg_side} px JPEGs → {s.jpeg_crop} px, {precision}"),
        measure("JPEG: the stage (PIL in workers → HDF5)", "img", len(paths), stage, device),
        measure(f"JPEG: decode_jpeg on {device.type} + bare loop", "img", len(paths), on_device, device, note=where),
    ]


# --------------------------------------------------------------------------- 3-4. heads and kNN


def synthetic_features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes that overlap (a probe has work to do), float32."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    return centres[y] + rng.standard_normal((n, dim), dtype=np.float32) * 3, y


def head_rows(tmp: Path, device: torch.device, s: Sizes) -> list[Row]:
    """A 3-candidate sweep, 30 iterations each, chosen on a validation split of a tenth of the size."""
    from storage.features import FeatureStore
    from storage.keys import feature_key, feature_spec
    from tasks.heads.linear import LogisticHead, TorchLinearHead

    X, y = synthetic_features(s.head_rows, s.head_dim, s.head_classes, 1)
    Xv, yv = synthetic_features(s.head_rows // 10, s.head_dim, s.head_classes, 2)
    spec = feature_spec(backbone="synthetic", weights="gaussian", layers=["penultimate"], pooling="avg",
                        preprocess={}, dataset="gpu-benchmark", split="train", dtype="float16", precision="fp32")
    key = feature_key(spec)
    store = FeatureStore(tmp / "heads-cache")
    block = 4096
    store.write(key, ({"penultimate": X[i : i + block].astype(np.float16)} for i in range(0, len(X), block)), y,
                classes=[f"c{i}" for i in range(s.head_classes)], dims={"penultimate": s.head_dim}, spec=spec)
    grid, iters = [0.1, 1.0, 10.0], 30
    cpu = torch.device("cpu")
    shape = f"{s.head_rows:,} x {s.head_dim} x {s.head_classes} classes, 3 candidates x {iters} iterations"

    def sklearn():
        LogisticHead(C=grid, max_iter=iters).fit(X, y, Xv, yv)

    def linear():
        TorchLinearHead(weight_decay=[1 / (c * len(y)) for c in grid], max_iter=iters, device=str(device)).fit(X, y, Xv, yv)

    def streaming():
        TorchLinearHead(weight_decay=[1 / (c * len(y)) for c in grid], max_iter=iters, device=str(device)).fit_rows(
            store.rows(key, "penultimate"), Xv, yv, chunk_rows=8192)

    return [
        measure("logistic sweep, scikit-learn, cpu", "row", len(y), sklearn, cpu, warmup=False, note=shape),
        measure(f"linear sweep, torch L-BFGS, {device.type}", "row", len(y), linear, device),
        measure(f"linear sweep, streamed from HDF5, {device.type}", "row", len(y), streaming, device,
                note="8,192-row chunks moved to the device"),
    ]


def knn_rows(device: torch.device, s: Sizes) -> list[Row]:
    from tasks.heads.neighbours import knn_search, knn_torch

    bank, _ = synthetic_features(s.head_rows, s.head_dim, s.head_classes, 3)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries = bank[: s.queries]
    cpu = torch.device("cpu")
    note = f"{s.queries:,} queries x {len(bank):,} bank rows x {s.head_dim}, k=20"
    chunks = lambda: ((b0, bank[b0 : b0 + 4096]) for b0 in range(0, len(bank), 4096))  # noqa: E731
    return [measure("kNN search, numpy, cpu", "query", len(queries),
                    lambda: knn_search(queries, bank, 20, 4096, "cpu"), cpu, note=note),
            measure(f"kNN search, torch, {device.type}", "query", len(queries),
                    lambda: knn_torch(queries, chunks, 20, 4096, device), device)]


# --------------------------------------------------------------------------- 5. fine-tuning


def finetune_rows(images: Path, tmp: Path, device: torch.device, s: Sizes) -> list[Row]:
    """One epoch of the stage (``layer4`` unfrozen, random head, no augmentation), AMP off and on: the training
    pass's images/s as the stage records it, after one warm-up run."""
    from tasks.data.config import DataConfig
    from tasks.extract.plan import ExtractConfig, plan_extraction
    from tasks.finetune.plan import FinetuneConfig, plan_finetune
    from tasks.finetune.stage import finetune
    from tasks.machine import forward_precision

    data = DataConfig(source="imagefolder", root=images, val_fraction=0.1, test_fraction=0)
    backbone = BackboneConfig(name=s.models[-1], weights="none", preprocess={"resize": s.ft_crop, "crop": s.ft_crop})
    manifest = plan_extraction(data, backbone, ExtractConfig(), tmp / "ft-plan")["train"].manifest
    spec = resolve(backbone)

    def epoch(amp: bool, run: str) -> Row:
        cfg = FinetuneConfig(enabled=True, epochs=1, batch_size=s.ft_batch, init_head="random", augment="none",
                             early_stopping=None, unfreeze=["layer4"], device=str(device), amp=amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = finetune(plan_finetune(cfg, spec, manifest, tmp / run, {}, []))
        assert not result.cache_hit
        precision = forward_precision(str(device), amp)
        return Row(f"fine-tune epoch, AMP {'on' if amp else 'off'} ({precision})", result.history[0].images_per_s,
                   "img", peak_mib(device))

    epoch(False, "ft-warmup")
    rows = [epoch(False, "ft-fp32"), epoch(True, "ft-amp")]
    rows[0].note = f"{s.models[-1]}, layer4 unfrozen, {s.ft_crop} px, batch {s.ft_batch}"
    return rows


# --------------------------------------------------------------------------- the table


def print_group(title: str, rows: list[Row]) -> None:
    base = rows[0].rate
    print(f"\n{title}")
    for row in rows:
        ratio = row.rate / base if base else float("nan")
        print(f"  {row.label:<48}{row.rate:>11,.0f} {row.unit}/s{ratio:>7.2f}x{row.peak:>9,.0f}  {row.note}".rstrip(),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when there)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile too (default: on a GPU without --quick)")
    args = parse_args(parser, {})
    from tasks.machine import pick_device

    device = pick_device(args.device)
    sizes = QUICK if args.quick else FULL_GPU if device.type == "cuda" else FULL_CPU
    compile_too = args.compile if args.compile is not None else device.type == "cuda" and not args.quick
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    started = time.perf_counter()
    print(f"gpu benchmark on {device} ({name}), torch {torch.__version__}, "
          f"{'quick (figures mean nothing)' if args.quick else 'full'}")
    print(f"  {'row':<48}{'per second':>15}{'ratio':>8}{'peak MiB':>9}  (ratio: to the group's first row)")
    for model in sizes.models:
        print_group(f"1. extraction from uint8 tensors on {device.type}: {model}, batch {sizes.batch}, {sizes.crop} px",
                    tensor_rows(model, device, sizes, compile_too))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "jpegs", sizes.jpegs, sizes.jpeg_side)
        print_group(f"2. extraction from {sizes.jpegs:,} JPEG files: {sizes.models[-1]}, batch {sizes.batch}",
                    jpeg_rows(tmp / "jpegs", tmp, device, sizes))
        print_group("3. heads on cached features", head_rows(tmp, device, sizes))
        print_group("4. kNN search", knn_rows(device, sizes))
        make_images(tmp / "ft-images", sizes.ft_images, sizes.ft_crop + sizes.ft_crop // 4)
        print_group(f"5. fine-tuning on {device.type}", finetune_rows(tmp / "ft-images", tmp, device, sizes))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
