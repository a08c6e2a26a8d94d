"""``transferpipe plan``: every stage's key, computed as a run would, with no flow and no forward pass;
for each item whether the cache holds it and, if not, why: the key fields that differ from the closest
cached entry (data changes as files added, removed or changed), or "never computed"."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.config import ExperimentConfig
from storage import artifacts, inventory
from storage.features import FeatureStore
from storage.keys import closest, short
from storage.layout import CacheLayout
from tasks import evaluate, extract, finetune, heads
from tasks.backbones import resolve
from tasks.data import Manifest
from tasks.evaluate import ModelToEvaluate


@dataclass
class Item:
    """One unit of work a run would do: cached, or to compute and why."""

    stage: str
    what: str
    key: str | None
    cached: bool
    why: list[str] = field(default_factory=list)


def explain(config: ExperimentConfig) -> list[Item]:
    """What a run of ``config`` would compute, stage by stage, and why."""
    store = FeatureStore(config.cache_dir)
    plans = extract.plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    items = [_features(config.cache_dir, store, plan) for plan in plans.values()]
    trained, head_plans = [], []
    if config.heads:
        head_plans = heads.plan_for_splits(config.heads, {s: p.key for s, p in plans.items()}, config.cache_dir)
        specs = artifacts.stored_specs(config.cache_dir)
        for plan in head_plans:
            for shot, seed, key in heads.fits(plan):
                cached = artifacts.head_exists(config.cache_dir, key)
                why = [] if cached else why_not_cached(heads.fit_spec(plan, shot, seed), specs)
                items.append(Item("heads", f"{plan.head.label} shot {shot} seed {seed}", key, cached, why))
        trained = [heads.stored_result(p) for p in head_plans if heads.is_stored(p)]
    tuned = _finetune(config, plans, trained, len(trained) == len(head_plans), items) if config.finetune.enabled else None
    if "test" in plans:
        items.append(_evaluation(config, plans, head_plans, tuned))
    return items


def _features(cache_dir: Path, store: FeatureStore, plan: extract.SplitPlan) -> Item:
    if store.lookup(plan.key) is not None:
        return Item("extract", plan.split, plan.key, True)
    return Item("extract", plan.split, plan.key, False, why_features(cache_dir, plan))


def why_features(cache_dir: Path, plan: extract.SplitPlan) -> list[str]:
    """Why a split's features are not cached: what differs from the closest feature file in the cache."""
    specs = [e.spec for e in inventory.entries(FeatureStore(cache_dir)) if e.complete]
    found = closest(plan.spec, specs)
    if found is None:
        return ["never computed"]
    old, diffs = found
    why = [_data_change(cache_dir, plan, old["dataset"]) if d.startswith("dataset ") else d for d in diffs]
    return why or ["the cached file is incomplete or was set aside"]


def _data_change(cache_dir: Path, plan: extract.SplitPlan, old_fingerprint: str) -> str:
    """``data: N files added, M removed, K changed (e.g. …)`` against the manifest the old features came from."""
    new = Manifest.load(plan.manifest)
    for path in CacheLayout(cache_dir).manifests().glob("*.json"):
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if raw.get("fingerprints", {}).get(plan.split) == old_fingerprint and plan.split in raw.get("files", {}):
            before = {p: ident for (p, _), ident in zip(raw["splits"][plan.split], raw["files"][plan.split])}
            after = {p: ident for (p, _), ident in zip(new.splits[plan.split], new.files[plan.split])}
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            changed = sorted(p for p in set(after) & set(before) if after[p] != before[p])
            parts = [f"{len(v)} file(s) {name}" for name, v in (("added", added), ("removed", removed),
                                                                  ("changed", changed)) if v]
            example = (changed or added or removed or ["?"])[0]
            return f"data: {', '.join(parts) or 'labels or classes changed'} (e.g. {example})"
    return "data: the images of this split differ from the cached features' (their manifest is gone)"


def why_not_cached(spec: dict[str, Any], stored: list[dict[str, Any]]) -> list[str]:
    """What differs from the closest stored spec of the same kind, or that there is none."""
    found = closest(spec, stored)
    return ["never computed"] if found is None else (found[1] or ["the cached entry is incomplete"])


def _finetune(config, plans, trained, heads_stored: bool, items: list[Item]) -> finetune.FinetunePlan | None:
    if config.finetune.init_head == "best_probe" and not heads_stored:
        items.append(Item("finetune", config.backbone.name, None, False,
                          ["its LP-FT probe is chosen from heads that will be trained first"]))
        return None
    probe = heads.best_probe(trained, config.cache_dir) if config.finetune.init_head == "best_probe" else None
    plan = finetune.plan_finetune(config.finetune, resolve(config.backbone, config.cache_dir),
                                  plans["train"].manifest, config.cache_dir,
                                  {s: p.key for s, p in plans.items()}, probe)
    cached = finetune.is_stored(plan)
    items.append(Item("finetune", config.backbone.name, plan.key, cached,
                      [] if cached else why_not_cached(plan.spec, finetune.stored_specs(config.cache_dir))))
    return plan


def _evaluation(config, plans, head_plans, tuned) -> Item:
    if config.finetune.enabled and tuned is None:
        return Item("evaluate", config.name, None, False, ["the fine-tuned model it scores is trained first"])
    models = [ModelToEvaluate(name=p.head.label, kind=p.head.kind, layer=p.head.layer, shot=shot, seed=seed,
                              head_key=key) for p in head_plans for shot, seed, key in heads.fits(p)]
    if tuned is not None:
        models.append(ModelToEvaluate(name="finetuned", kind="finetune",
                                      checkpoint=finetune.run_files(tuned).best))
    test = plans["test"]
    plan = evaluate.plan_evaluation(config.name, test.key, test.manifest, config.cache_dir,
                                    resolve(config.backbone, config.cache_dir), [], models)
    cached = evaluate.is_stored(plan)
    return Item("evaluate", config.name, plan.key, cached,
                [] if cached else why_not_cached(plan.spec, evaluate.stored_specs(config.cache_dir, config.name)))


def render(items: list[Item]) -> list[str]:
    """One line per item: stage, what, cached or compute, key, and the reasons below it."""
    lines = []
    for item in items:
        state = "cached " if item.cached else "compute"
        key = short(item.key) if item.key else "-"
        lines.append(f"{item.stage:<9} {item.what:<32} {state}  {key}")
        lines += [f"{'':<9}   why: {why}" for why in item.why]
    return lines
