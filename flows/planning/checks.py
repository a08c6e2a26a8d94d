"""What the later stages of a run need, checked once extraction is planned and before anything computes: a
test split, heads to train, few-shot counts the classes can give, modules to unfreeze, the layers later
stages read, the devices asked for.
"""
from __future__ import annotations

from collections import Counter

from flows.config import ExperimentConfig
from tasks.declare import Planned, Stage, Work, features
from tasks.evaluate.plan import feature_reports, test_split
from tasks.stages import BY_NAME
from tasks.backbones.config import module_names
from tasks.data.manifest import Manifest
from tasks.machine import cuda_possible


def check_inputs(config: ExperimentConfig, chosen: list[Stage], extraction: list[Work]) -> list[str]:
    """What the later stages need, checked before anything computes: a test split, heads to train, few-shot
    counts the classes can give, modules to unfreeze, the splits and layers later stages read, the devices asked
    for. Raises for what stops a run; returns notes on what it runs without (classes with no image in a split)."""
    planned, names = {"extract": Planned(extraction)}, {s.name for s in chosen}
    manifest = Manifest.load(features(planned)["train"].manifest)  # one file holds every split: read it once
    devices = {"extract.device": config.extract.device}
    if "heads" in names:
        BY_NAME["heads"].plan(config, planned)
        _check_shots(config, manifest)
        devices |= {f"heads.{h.label}.device": h.device for h in config.heads if hasattr(h, "device")}
    if "finetune" in names:
        devices["finetune.device"] = config.finetune.device
        _check_unfreeze(config)
    if "evaluate" in names:
        feature_reports(config, features(planned) | {"test": test_split(planned)})
    for side in ("export", "index"):  # their splits and layers
        if side in names:
            BY_NAME[side].plan(config, planned)
    wanted = {field: device for field, device in devices.items() if device.startswith("cuda")}
    if wanted and not cuda_possible():
        field, device = next(iter(wanted.items()))
        raise ValueError(f"{field} {device!r} is requested but torch sees no CUDA device; use auto or cpu")
    return _empty_classes(manifest)


def _empty_classes(manifest: Manifest) -> list[str]:
    """Classes with no image in a split the run uses: named, since their metrics (test) or the chosen settings
    (val) cannot reflect them."""
    notes = []
    for split in manifest.splits:
        if split == "train":
            continue  # a fraction split keeps one training image per class; a folder split with none fails later
        have = Counter(label for _, label in manifest.splits[split])
        empty = [name for i, name in enumerate(manifest.classes) if not have[i]]
        if empty:
            shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            notes.append(f"data: {len(empty)} class(es) have no {split} image: {shown} (too few images for "
                         f"{split}_fraction, or an empty {split} folder); "
                         + ("their test accuracy is left out of the report" if split == "test" else
                            "settings are chosen on val without them"))
    return notes


def _check_shots(config: ExperimentConfig, train: Manifest) -> None:
    counts = Counter(label for _, label in train.splits["train"])
    fewest, label = min((counts[i], i) for i in range(len(train.classes)))
    for head in config.heads:
        too_many = [s for s in head.shots if s != "all" and s > fewest]
        if too_many:
            raise ValueError(f"heads: {head.label} asks for {too_many[0]} labels per class, but class "
                             f"{train.classes[label]!r} has {fewest} training image(s); use at most {fewest}, or 'all'")


def _check_unfreeze(config: ExperimentConfig) -> None:
    for _, cfg in config.finetune.candidates():
        _check_modules(config, cfg.unfreeze if cfg.last_n is None else "all")


def _check_modules(config: ExperimentConfig, unfreeze: list[str] | str) -> None:
    if unfreeze == "all":
        return
    names = set(module_names(config.backbone, config.cache_dir))
    bad = [n for n in unfreeze if n not in names]
    if bad:
        top = [n for n in sorted(names) if n and "." not in n]
        raise ValueError(f"finetune.unfreeze: unknown module(s) {bad}; top-level modules of {config.backbone.name}: "
                         f"{', '.join(top)} (dotted names reach inside)")
