"""Labels as sources find them (integers or class names) turned into class indices, and the items left out.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from tasks.data.config import Items
from tasks.data.errors import DataError

log = logging.getLogger("transferpipe.data")


def sorted_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels as class names: integers in numeric order, else names in sorted order."""
    distinct = set(labels)
    if distinct and all(label.lstrip("-").isdigit() for label in distinct):
        return [str(v) for v in sorted(int(label) for label in distinct)]
    return sorted(distinct)


def labelled(raw: dict[str, list[tuple[str, str]]], classes: list[str], numbered: bool,
              bad: list[tuple[str, str, str]], unknown: str) -> Items:
    """Items with their labels' class indices (:func:`class_index`); an unknown label goes to ``bad``."""
    index = {name: i for i, name in enumerate(classes)}
    items: Items = {}
    known: dict[str, int | None] = {}  # a million labels are a few distinct ones
    for split, pairs in raw.items():
        for item, label in pairs:
            at = known[label] if label in known else known.setdefault(label, class_index(label, index, classes,
                                                                                           numbered))
            if at is None:
                bad.append((item, f"label {label!r} {unknown}", split))
            else:
                items.setdefault(split, []).append((item, at))
    return items


def class_index(label: str, index: dict[str, int], classes: list[str], named: bool) -> int | None:
    """With a classes.txt an integer label is its line number; otherwise labels are names (integers too)."""
    if label.lstrip("-").isdigit():
        if named:
            return int(label) if 0 <= int(label) < len(classes) else None
        return index.get(str(int(label)))
    return index.get(label)


def bad_items(bad: list[tuple[str, str, str]], what: str, on_bad_image: str) -> list[dict[str, str]]:
    """``(item, why, split)`` found by a scan: an error naming them, or with ``on_bad_image: skip`` a warning
    and the list of what is left out."""
    if not bad:
        return []
    shown = "; ".join(f"{item}: {why}" for item, why, _ in bad[:5]) + (
        f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if on_bad_image != "skip":
        raise DataError(f"{len(bad)} bad {what}: {shown}. Fix them, or set data.on_bad_image: skip to leave them out")
    log.warning("left out %d bad %s: %s", len(bad), what, shown)
    return [{"path": item, "error": why, "split": split} for item, why, split in bad]
