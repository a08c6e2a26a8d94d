"""The ``data:`` config, manifests, splits and the one decode path from an item's bytes to an RGB image.

The output of this layer is a :class:`Manifest`: the dataset's source and root,
class names, and per split the sorted ``(item id, label)`` pairs plus a
fingerprint. Where the items come from is the business of the dataset sources
(:mod:`tasks.datasources`). Everything is checked before any compute:
unreadable roots, empty classes, a single class and empty splits are errors
that name the folder or field.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from storage.atomic import write_text
from storage.keys import dataset_id, manifest_fingerprint
from tasks import datasources
from tasks.datasources import SPLITS, DataError, DigitsConfig


class BadImageError(DataError):
    """Images that cannot be decoded, with ``on_bad_image: error``."""

    def __init__(self, bad: list[dict[str, str]], where: str) -> None:
        self.bad, self.where = bad, where
        shown = "; ".join(f"{b['path']} ({b['error']})" for b in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        super().__init__(
            f"{len(bad)} image(s) in {where} cannot be decoded: {shown}{more}. "
            "Fix or remove them, or set data.on_bad_image: skip to leave them out"
        )

    @classmethod
    def joined(cls, errors: list[BadImageError]) -> BadImageError:
        """One error naming the bad images of several splits (each split's extraction collects its own)."""
        return cls([b for e in errors for b in e.bad], " and ".join(e.where for e in errors))


def resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths in a config file are relative to that file's folder."""
    if value is None:
        return None
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


class DataConfig(BaseModel):
    """``data:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal[tuple(datasources.SOURCES)] = "digits"  # the registry's names (tasks/datasources.py)
    root: Path | None = Field(None, description="imagefolder: the folder; csv: the CSV file; table: the folder "
                                                "image paths are relative to (default: the table's)")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    fingerprint: Literal["stat", "content"] = "stat"
    digits: DigitsConfig = DigitsConfig()
    shards: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="webdataset: tar shards, a brace pattern or a list, or {train: …, val: …, test: …}; "
                          "relative to the config's folder")
    path: str | None = Field(None, description="table: a .parquet, .csv or .jsonl file, or a glob of them")
    image: str = Field("image", description="table: the column with image bytes, a {bytes, path} struct, or paths")
    label: str = Field("label", description="table: the column with integer labels or class names")
    split: str | None = Field(None, description="table: a column with train / val (validation) / test")
    paths: Literal["anywhere", "inside_root"] = Field(
        "anywhere", description="csv/table of paths: 'anywhere' reads every file a row names (absolute, or "
                                "relative with '..'); 'inside_root' leaves out (or fails on) a row whose file, links "
                                "resolved, is not under data.root")
    label_key: str = Field("cls", pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$",
                           description="webdataset: the member holding the label (cls, txt, or json.<field>)")

    _resolve_root = field_validator("root")(resolve_path)

    @field_validator("path")
    @classmethod
    def _resolve_table(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        return str(resolve_path(Path(v), info))

    @field_validator("shards")
    @classmethod
    def _resolve_shards(cls, v: Any, info: ValidationInfo) -> Any:
        """Relative patterns are relative to the config's folder; split names are checked."""
        if v is None:
            return None
        base = (info.context or {}).get("base_dir")

        def place(pattern: str) -> str:
            pattern = os.path.expanduser(pattern)
            remote = "://" in pattern or pattern.startswith("pipe:")
            return pattern if remote or os.path.isabs(pattern) or base is None else os.path.join(base, pattern)

        def patterns(value: str | list[str]) -> list[str]:
            listed = [value] if isinstance(value, str) else list(value)
            if not listed:
                raise ValueError("data.shards: an empty list")
            return [place(p) for p in listed]

        if isinstance(v, dict):
            unknown = sorted(set(v) - set(SPLITS))
            if unknown or "train" not in v:
                raise ValueError(f"data.shards per split takes train (required), val, test; got {sorted(v)}")
            return {split: patterns(value) for split, value in v.items()}
        return patterns(v)

    def shard_patterns(self) -> dict[str, list[str]]:
        """``data.shards`` per split (``all`` when one pattern or list is split by the fractions)."""
        return dict(self.shards) if isinstance(self.shards, dict) else {"all": list(self.shards or [])}


    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        source = datasources.get(self.source)
        if source.needs_root and self.root is None:
            raise ValueError(f"source {self.source!r} needs data.root")
        wds = self.source == "webdataset"
        if wds and self.shards is None:
            raise ValueError('source webdataset needs data.shards, e.g. shards: "shards/train-{000000..000009}.tar"')
        if wds and self.root is not None:
            raise ValueError("data.root does not apply to source webdataset: data.shards names the tar files "
                             "(relative to the config's folder)")
        if not wds and self._set("shards", "label_key"):
            raise ValueError("data.shards and data.label_key apply to source: webdataset only")
        if self.source == "table" and self.path is None:
            raise ValueError("source table needs data.path: a .parquet, .csv or .jsonl file, or a glob of them")
        if self.source != "table" and self._set("path", "image", "label", "split"):
            raise ValueError("data.path, data.image, data.label and data.split apply to source: table only")
        for other in datasources.SOURCES.values():
            if other.option and other is not source and self._set(other.option):
                raise ValueError(f"data.{other.option} applies to source: {other.name} only")
        return self

    def _set(self, *fields: str) -> bool:
        """Whether any of ``fields`` differs from its default."""
        return any(getattr(self, f) != type(self).model_fields[f].default for f in fields)


@dataclass(frozen=True)
class Manifest:
    """Which images form each split; small, saved as JSON beside the cache."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    fingerprints: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Any]] = field(default_factory=dict)  # per split, each file's identity (size+mtime or sha256)
    source: str = "imagefolder"  # the dataset source that opens its items (tasks/datasources.py)
    options: dict[str, str] = field(default_factory=dict)  # what the source needs to open an item (a table's column)
    left_out: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # per split, what a scan left out

    def save(self, path: Path) -> Path:
        """Written when it changed (atomically); an unchanged one is left alone, so a read-only cache plans."""
        payload = {
            "root": str(self.root), "classes": self.classes, "source": self.source,
            "splits": self.splits, "fingerprints": self.fingerprints, "files": self.files,
            **({"options": self.options} if self.options else {}),
            **({"left_out": self.left_out} if self.left_out else {}),
        }
        text = json.dumps(payload)
        try:
            same = path.read_text() == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            write_text(path, text)
        _remember(_stamp(path), self)  # the next load of this file is this object
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """The manifest at ``path``; one parse per process while the file stays the same (a plan reads it from
        every stage, and at a million items a parse takes seconds). Treat it as read-only."""
        stamp = _stamp(path)
        if stamp not in _LOADED:
            _remember(stamp, _parse_manifest(Path(path)))
        return _LOADED[stamp]

    def image(self, item: str) -> Image.Image:
        """One item decoded to RGB (:func:`read_image`)."""
        return read_image(self.source, self.root, item, self.options)

    @property
    def dataset_id(self) -> str:
        return dataset_id(self.fingerprints)


_LOADED: dict[tuple[str, int, int], Manifest] = {}  # (path, size, mtime) -> the manifest, the last few


def _stamp(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def _remember(stamp: tuple[str, int, int], manifest: Manifest) -> None:
    _LOADED.pop(stamp, None)
    _LOADED[stamp] = manifest
    while len(_LOADED) > 4:
        _LOADED.pop(next(iter(_LOADED)))


def _parse_manifest(path: Path) -> Manifest:
    raw = json.loads(path.read_text())
    splits = {s: [(p, int(y)) for p, y in items] for s, items in raw["splits"].items()}
    return Manifest(Path(raw["root"]), raw["classes"], splits, raw["fingerprints"], raw.get("files", {}),
                    raw.get("source", "imagefolder"), raw.get("options", {}), raw.get("left_out", {}))


def build_manifest(cfg: DataConfig, cache_dir: Path) -> Manifest:
    """Scan the configured source and split it; raises DataError before any compute."""
    source = datasources.get(cfg.source)
    root, classes, splits, left_out = source.scan(cfg, cache_dir)
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
    options = source.options(cfg)
    files = {s: source.identities(root, items, content, options) for s, items in splits.items()}
    fps = {s: manifest_fingerprint(items, files[s], classes, content, options) for s, items in splits.items()}
    skipped: dict[str, list[dict[str, str]]] = {}
    for entry in left_out:  # a sample left out of a split by fraction goes where its hash would have put it
        split = entry["split"] if entry["split"] != "all" else _fraction_split(
            entry["path"], cfg.val_fraction, cfg.test_fraction, cfg.seed)
        skipped.setdefault(split, []).append({"path": entry["path"], "error": entry["error"]})
    return Manifest(root, classes, splits, fps, files, source=cfg.source, options=options, left_out=skipped)


def split_by_fraction(
    items: list[tuple[str, int]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Seeded split by each item's own hash: ``u = hash(seed, id)`` in [0, 1) puts it in test below
    ``test_fraction``, in val below ``test_fraction + val_fraction``, else in train.

    An image's split depends on its id and the seed only, so a dataset that grows never moves an image from one
    split to another (the pieces of the features already extracted stay valid). Small classes are kept usable:
    a class whose share of a split rounds to at least one image but that drew none there gives it its
    lowest-``u`` training image, and every class keeps at least one training image.
    """
    items = items if all(a <= b for a, b in zip(items, items[1:])) else sorted(items)
    salt = f"{seed}\0".encode()
    hashes = [_hash(salt, p) for p, _ in items]
    cuts = _cuts(val_fraction, test_fraction)
    drawn = [0 if u < cuts[0] else 1 if u < cuts[1] else 2 for u in hashes]  # 0 test, 1 val, 2 train
    counts: dict[int, list[int]] = {}
    for (_, y), d in zip(items, drawn):
        counts.setdefault(y, [0, 0, 0])[d] += 1
    for label, (n_test, n_val, n_train) in counts.items():  # the few small classes that drew badly
        n = n_test + n_val + n_train
        short = [d for d, (got, frac) in enumerate(((n_test, test_fraction), (n_val, val_fraction)))
                 if not got and round(n * frac) >= 1]
        if (short and n_train > 1) or not n_train:
            _rebalance(items, hashes, drawn, label, short[: n_train - 1])
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    names = ("test", "val", "train")
    for item, d in zip(items, drawn):
        out[names[d]].append(item)
    return out


def _hash(salt: bytes, item: str) -> int:
    return int.from_bytes(hashlib.blake2b(salt + item.encode(), digest_size=8).digest(), "big")


def _cuts(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """A 64-bit hash below the first is test, below the second val, else train."""
    return test_fraction * 2**64, (test_fraction + val_fraction) * 2**64


def _fraction_split(item: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """The split an item's hash alone puts it in (before the small-class adjustments)."""
    u, (test_cut, val_cut) = _hash(f"{seed}\0".encode(), item), _cuts(val_fraction, test_fraction)
    return "test" if u < test_cut else "val" if u < val_cut else "train"


def _rebalance(items: list[tuple[str, int]], hashes: list[int], drawn: list[int], label: int,
               short: list[int]) -> None:
    """A class with no training image trains its highest-hash one; one that drew no image for a split in
    ``short`` gives it its lowest-hash training image."""
    mine = sorted((hashes[i], i) for i, (_, y) in enumerate(items) if y == label)
    train = [i for _, i in mine if drawn[i] == 2]
    if not train:
        drawn[mine[-1][1]] = 2
        return
    for d in short:
        drawn[train.pop(0)] = d


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


def decode(data: IO[bytes]) -> Image.Image:
    """The one decode path: an item's encoded bytes to 8-bit RGB, decoded fully (a truncated file fails here)."""
    with Image.open(data) as img:
        img.load()
        return to_rgb(img)


def read_image(source: str, root: Path, item: str, options: dict[str, str] | None = None) -> Image.Image:
    """One dataset item, opened by its source and decoded (extraction, fine-tuning and evaluation read this)."""
    with datasources.get(source).open(root, item, options or {}) as fh:
        return decode(fh)


def load_rgb(path: Path) -> Image.Image:
    """An image file outside any dataset (a path), decoded like every item."""
    with open(path, "rb") as fh:
        return decode(fh)


def header_error(manifest: Manifest, item: str) -> str | None:
    """Cheap check (reads the header only): why the item is not an image, or None."""
    try:
        with datasources.get(manifest.source).open(manifest.root, item, manifest.options) as fh, Image.open(fh) as img:
            img.size
    except DECODE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_headers(manifest: Manifest, items: Iterable[tuple[str, int]], threads: int = 8) -> dict[str, str]:
    """``{item id: error}`` for items that are not images at all (zero bytes, garbage)."""
    paths = [p for p, _ in items]
    with ThreadPoolExecutor(threads) as pool:
        errors = pool.map(lambda p: header_error(manifest, p), paths)
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
