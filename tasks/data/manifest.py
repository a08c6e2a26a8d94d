"""The manifest: a dataset's source and root, class names, and per split the sorted ``(item id, label)`` pairs
plus a fingerprint; and the seeded, class-balanced split by fractions.

Everything is checked before any compute: unreadable roots, empty classes, a single class and empty splits
are errors that name the folder or field.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from storage.atomic import write_text
from storage.keys import dataset_id, manifest_fingerprint
from tasks.data.config import DataConfig, get
from tasks.data.errors import SPLITS, DataError
from tasks.data.images import DECODE_ERRORS, read_image


@dataclass(frozen=True)
class Manifest:
    """Which images form each split; small, saved as JSON beside the cache."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    fingerprints: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Any]] = field(default_factory=dict)  # per split, each file's identity (size+mtime or sha256)
    source: str = "imagefolder"  # the dataset source that opens its items (tasks/data/)
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
    source = get(cfg.source)
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



def header_error(manifest: Manifest, item: str) -> str | None:
    """Cheap check (reads the header only): why the item is not an image, or None."""
    try:
        with get(manifest.source).open(manifest.root, item, manifest.options) as fh, Image.open(fh) as img:
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
