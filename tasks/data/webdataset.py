"""The ``webdataset`` source: tar shards read in place through :mod:`tasks.data.tar_index`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import IO, Any

from storage.keys import shard_scan_key
from storage.layout import CacheLayout
from storage.records import Records
from tasks.data.config import DataConfig, DataSource, Scan
from tasks.data.errors import IMAGE_EXTENSIONS, DataError
from tasks.data.labels import bad_items, labelled, sorted_labels


class WebDataset(DataSource):
    """WebDataset tar shards (``data.shards``: a brace pattern, a list, or one per split), read in place.

    A sample's id is ``<shard file, relative to the shards' common folder>/<key>``; its image is its first
    member with an image extension, its label the ``data.label_key`` member (``cls``, ``txt``, or
    ``json.<field>``): an integer or a class name. Class names come from ``classes.txt`` beside the shards,
    else from the sorted distinct labels.
    """

    name = "webdataset"
    needs_root = False
    fields = ("shards", "label_key")
    required = {"shards": ', e.g. shards: "shards/train-{000000..000009}.tar"'}

    def check(self, cfg: DataConfig) -> None:
        super().check(cfg)
        if cfg.root is not None:
            raise ValueError("data.root does not apply to source webdataset: data.shards names the tar files "
                             "(relative to the config's folder)")

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        from tasks.data import tar_index

        try:
            shards = {split: tar_index.expand(patterns) for split, patterns in cfg.shard_patterns().items()}
        except tar_index.ShardError as exc:
            raise DataError(str(exc)) from None
        files = [f for paths in shards.values() for f in paths]
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]))
        ext, _, field = cfg.label_key.partition(".")
        raw: dict[str, list[tuple[str, str]]] = {}
        bad: list[tuple[str, str, str]] = []  # (item or shard, why, split)
        memo = Records(CacheLayout(cache_dir).shard_scan)
        for split, paths in shards.items():
            for path in paths:
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if os.path.getsize(path) == 0:
                    log.warning("shard %s is empty (0 bytes): it holds no sample", path)
                try:
                    truncated, samples = _wds_scan(path, ext, field, memo)
                except tar_index.ShardError as exc:
                    bad.append((rel, str(exc), split))
                    continue
                if truncated:
                    bad.append((rel, truncated, split))
                for key, label, why in samples:
                    if why is not None:
                        bad.append((f"{rel}/{key}", why, split))
                    else:
                        raw.setdefault(split, []).append((f"{rel}/{key}", label))
        named = root / "classes.txt"
        classes = _wds_classes(named, [label for pairs in raw.values() for _, label in pairs])
        items = labelled(raw, classes, named.is_file(), bad, f"is not a class in {named}")
        left_out = bad_items(bad, "sample(s) or shard(s) in data.shards", cfg.on_bad_image)
        if len(classes) < 2:
            raise DataError(f"data.shards under {root}: found {len(classes)} class(es) {classes}; "
                            "a classifier needs at least 2")
        return Scan(root, classes, {split: sorted(pairs) for split, pairs in items.items()}, left_out)

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Stat: its shard's size and mtime (any change to a shard changes its samples' identities; no index is
        read); content: the image bytes' sha256."""
        import hashlib

        from tasks.data import tar_index

        if not content:
            stats: dict[str, list[int]] = {}
            for item, _ in items:
                shard = item.partition(".tar/")[0]
                if shard not in stats:
                    st = os.stat(os.path.join(root, shard + ".tar"))
                    stats[shard] = [st.st_size, st.st_mtime_ns]
            return [stats[item.partition(".tar/")[0]] for item, _ in items]
        shards: dict[str, Any] = {}
        return [hashlib.sha256(tar_index.read(*_wds_member(root, item, shards))).hexdigest() for item, _ in items]

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        from tasks.data import tar_index

        return tar_index.open_member(*_wds_member(root, item))

    def locations(self, root: Path, items: list[str], options: dict[str, str]) -> list[str]:
        """``<shard file>#<__key__>``: the shard's path and the sample's key in it."""
        return [os.path.join(root, shard + ".tar") + "#" + key for shard, _, key in (i.partition(".tar/") for i in items)]

    def piece_of(self, item: str) -> str | None:
        """Its shard (``train-000100.tar``): a shard's samples are cached together, a new shard is a new piece."""
        return item.partition(".tar/")[0] + ".tar"


log = logging.getLogger("transferpipe.data")


def _wds_member(root: Path, item: str, seen: dict[str, Any] | None = None) -> tuple[str, tuple[int, int]]:
    """A sample id's shard file and its image member's (offset, size); ``seen`` keeps each shard's index and
    stat for many lookups."""
    from tasks.data import tar_index

    shard, sep, key = item.partition(".tar/")
    if not sep:
        raise DataError(f"{item!r} is not a webdataset sample id (<shard>.tar/<key>)")
    path = os.path.join(root, shard + ".tar")
    if seen is None:
        found = tar_index.index(path)
    else:
        if path not in seen:  # ids sort by shard: the last shard's index is the one to keep
            seen.clear()
            st = os.stat(path)
            seen[path] = (tar_index.index(path), [st.st_size, st.st_mtime_ns])
        found = seen[path][0]
    members = found.samples.get(key)
    image = next((e for e in (members or {}) if f".{e.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)
    if image is None:
        raise FileNotFoundError(f"{path} has no image for sample {key!r} (the shard changed since it was scanned)")
    return path, members[image]


def _wds_scan(path: str, ext: str, field: str, memo: Records) -> tuple[str | None, list[tuple[str, str, str | None]]]:
    """One shard's ``(why it ends early, [(key, label, why the sample is bad)])``, remembered in the cache by the
    shard's path, size and mtime (a warm plan of a million samples reads no tar header)."""
    from tasks.data import tar_index

    st = os.stat(path)
    key = shard_scan_key(os.path.abspath(path), st.st_size, st.st_mtime_ns, [ext, field])
    known = memo.read(key)
    try:  # flat lists: a million samples decode in about a second; a damaged record counts as absent
        bad = known["bad"]
        return known["truncated"], [(k, label, bad.get(k)) for k, label in zip(known["keys"], known["labels"],
                                                                                 strict=True)]
    except (KeyError, TypeError, AttributeError, ValueError):
        pass
    found = tar_index.index(path)
    samples = []
    with tar_index.reader(path) as read:  # one open file per shard for its labels
        for name, members in found.samples.items():
            if _not_utf8(name):  # an id must be text: name it by its escaped bytes, leave it out or fail
                name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                samples.append((name, "", "its member names are not UTF-8"))
                continue
            label, why = _wds_label(read, members, ext, field)
            if why is None and name in found.duplicates:
                why = f"the shard holds sample key {name!r} more than once (members {', '.join(found.duplicates[name])})"
            if why is None and not any(f".{e.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS for e in members):
                why = f"no image member (has {', '.join(sorted(members))})"
            samples.append((name, label, why))
    try:
        memo.write(key, {"shard": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "truncated": found.truncated, "keys": [k for k, _, _ in samples],
                         "labels": [label for _, label, _ in samples], "bad": {k: w for k, _, w in samples if w}})
    except OSError:
        pass  # a read-only cache plans without remembering
    return found.truncated, samples


def _not_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


#: longer label members are refused (a 2-million-digit "label" exceeded Python's integer digit limit)
MAX_LABEL_CHARS = 1000


def _wds_label(read, members: dict[str, tuple[int, int]], ext: str, field: str) -> tuple[str, str | None]:
    """A sample's label as text (``read``: a shard's member reader), or ``("", why)`` when it has none."""
    import json

    if ext not in members:
        return "", f"no {ext!r} member for data.label_key"
    if members[ext][1] > 64 * MAX_LABEL_CHARS:
        return "", f"its {ext!r} member is {members[ext][1]:,} bytes: not a label"
    text = read(members[ext]).decode("utf-8", errors="replace").strip()
    if not field and len(text) > MAX_LABEL_CHARS:
        return "", f"its {ext!r} label is {len(text):,} characters long (at most {MAX_LABEL_CHARS:,})"
    if not field:
        return (text, None) if text else ("", f"empty {ext!r} label")
    try:
        value = str(json.loads(text)[field])
    except (ValueError, KeyError, TypeError):  # a huge integer's str() is a ValueError too
        return "", f"no field {field!r} in its {ext!r} member"
    if len(value) > MAX_LABEL_CHARS:
        return "", f"its {ext!r} label is {len(value):,} characters long (at most {MAX_LABEL_CHARS:,})"
    return value, None


def _wds_classes(named: Path, labels: list[str]) -> list[str]:
    if named.is_file():
        return [line.strip() for line in named.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted_labels(labels)
