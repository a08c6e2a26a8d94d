"""Why a split's features compute: the key fields that differ from the closest cached feature file.

Shared by ``transferpipe plan`` and a run's log (both through the extract stage's ``why``), so both
give the same reasons. Data changes are told as items added, removed or changed, and per piece of a
split that extracts again (a new shard, the items new in a folder's piece).
"""
from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storage import inventory
from storage.features import FeatureStore
from storage.keys import closest
from storage.layout import CacheLayout
from tasks.data.manifest import Manifest
from tasks.extract.pieces import Piece


def feature_specs(cache_dir: Path) -> list[dict[str, Any]]:
    """The specs of the complete feature files in the cache."""
    return [e.spec for e in inventory.entries(FeatureStore(cache_dir)) if e.complete]


def why_features(cache_dir: Path, split: str, manifest: Path, spec: dict[str, Any],
                 pieces: Sequence[Piece] = ()) -> list[str]:
    """Why a split's features are not cached: what differs from the closest feature file in the cache, then
    which of its pieces extract and why (the others are joined as they are)."""
    found = closest(spec, feature_specs(cache_dir))
    new, before = Manifest.load(manifest), None
    if found is None:
        why = ["never computed"]
    else:
        old, diffs = found
        why = []
        for diff in diffs:
            if diff.startswith("dataset "):
                line, before = _data_change(cache_dir, split, new, old["dataset"])
                why.append(line)
            else:
                why.append(diff)
        why = why or ["the cached file is incomplete or was set aside"]
    return why + (_pieces(cache_dir, split, new, pieces, before) if pieces else [])


def _data_change(cache_dir: Path, split: str, new: Manifest, old_fingerprint: str
                 ) -> tuple[str, dict[str, Any] | None]:
    """``data: N files added, M removed, K changed (e.g. …)`` against the manifest the old features came from,
    and that manifest's ``{id: identity}`` of the split."""
    for path in sorted(CacheLayout(cache_dir).manifests().glob("*.json")):
        try:  # a manifest of a million items takes seconds to parse: only the one that holds the fingerprint
            text = path.read_text()
            raw = json.loads(text) if old_fingerprint in text else {}
        except (OSError, ValueError):
            continue
        if raw.get("fingerprints", {}).get(split) == old_fingerprint and split in raw.get("files", {}):
            before = {p: ident for (p, _), ident in zip(raw["splits"][split], raw["files"][split])}
            after = {p: ident for (p, _), ident in zip(new.splits[split], new.files[split])}
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
            parts = [f"{len(v)} item(s) {name}" for name, v in (("added", added), ("removed", removed),
                                                                  ("changed", changed)) if v]
            example = (changed or added or removed or ["?"])[0]
            return f"data: {', '.join(parts) or 'labels or classes changed'} (e.g. {example})", before
    return "data: the images of this split differ from the cached features' (their manifest is gone)", None


def _pieces(cache_dir: Path, split: str, new: Manifest, pieces: Sequence[Piece], before: dict[str, Any] | None,
            shown: int = 5) -> list[str]:
    """``pieces: 1 of 101 to extract (…)`` and, per piece that extracts, what is new in it."""
    store = FeatureStore(cache_dir).pieces()
    todo = [p for p in pieces if not store.path(p.key).exists()]
    rows = sum(p.rows for p in todo)
    cached = f"; {len(pieces) - len(todo)} cached" if len(todo) < len(pieces) else ""
    lines = [f"pieces: {len(todo)} of {len(pieces)} to extract ({rows:,} of {len(new.splits[split]):,} images){cached}"]
    if before is None or not todo:
        return lines
    items, files = new.splits[split], new.files[split]
    old_ids = sorted(before)
    for piece in todo[:shown]:
        ids = [p for p, _ in items[piece.start : piece.stop]]
        added = sum(p not in before for p in ids)
        changed = sum(p in before and before[p] != f for p, f in zip(ids, files[piece.start : piece.stop]))
        removed = len(set(old_ids[bisect_left(old_ids, ids[0]) : bisect_right(old_ids, ids[-1])]) - set(ids))
        if piece.name.startswith("shard ") and added == len(ids):
            what = "added"
        else:
            parts = [f"{n} item(s) {name}" for name, n in (("added", added), ("changed", changed),
                                                             ("removed", removed)) if n]
            what = ", ".join(parts) or "not cached"
        lines.append(f"  {piece.name}: {what}")
    if len(todo) > shown:
        lines.append(f"  … and {len(todo) - shown} more piece(s)")
    return lines
