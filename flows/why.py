"""Why a stage computes: the key fields that differ from the closest cached entry of its kind.

Shared by ``transferpipe plan`` (flows/explain.py) and a run's log (flows/graph.py), so both
give the same reasons. Data changes are told as files added, removed or changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from storage import inventory
from storage.features import FeatureStore
from storage.keys import closest
from storage.layout import CacheLayout
from storage.records import Records
from tasks.data import Manifest


def why_not_cached(spec: dict[str, Any], stored: list[dict[str, Any]]) -> list[str]:
    """What differs from the closest stored spec of the same kind, or that there is none."""
    found = closest(spec, stored)
    return ["never computed"] if found is None else (found[1] or ["the cached entry is incomplete"])


def feature_specs(cache_dir: Path) -> list[dict[str, Any]]:
    """The specs of the complete feature files in the cache."""
    return [e.spec for e in inventory.entries(FeatureStore(cache_dir)) if e.complete]


def why_features(cache_dir: Path, split: str, manifest: Path, spec: dict[str, Any]) -> list[str]:
    """Why a split's features are not cached: what differs from the closest feature file in the cache."""
    found = closest(spec, feature_specs(cache_dir))
    if found is None:
        return ["never computed"]
    old, diffs = found
    why = [_data_change(cache_dir, split, manifest, old["dataset"]) if d.startswith("dataset ") else d for d in diffs]
    return why or ["the cached file is incomplete or was set aside"]


def _data_change(cache_dir: Path, split: str, manifest: Path, old_fingerprint: str) -> str:
    """``data: N files added, M removed, K changed (e.g. …)`` against the manifest the old features came from."""
    new = Manifest.load(manifest)
    for raw in Records(CacheLayout(cache_dir).manifest).values():
        if raw.get("fingerprints", {}).get(split) == old_fingerprint and split in raw.get("files", {}):
            before = {p: ident for (p, _), ident in zip(raw["splits"][split], raw["files"][split])}
            after = {p: ident for (p, _), ident in zip(new.splits[split], new.files[split])}
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
            parts = [f"{len(v)} file(s) {name}" for name, v in (("added", added), ("removed", removed),
                                                                  ("changed", changed)) if v]
            example = (changed or added or removed or ["?"])[0]
            return f"data: {', '.join(parts) or 'labels or classes changed'} (e.g. {example})"
    return "data: the images of this split differ from the cached features' (their manifest is gone)"
