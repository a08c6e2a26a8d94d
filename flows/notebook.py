"""Cached features in a notebook or your own script: arrays, chunks, or a torch Dataset, from an experiment config.

    from flows.notebook import cached_features
    train = cached_features("configs/digits-resnet18.yaml", "train")
    train.X, train.y, train.ids, train.classes      # features (stored dtype), labels, image ids, class names
    for start, block in train.chunks(): ...         # a split bigger than memory, read in row chunks
    ds = train.dataset()                            # a torch Dataset of (float32 features, label)

Nothing is computed here: a split that is not in the cache raises :class:`NotCached`, one line saying which
command computes it. Importing this module and reading features imports neither torch nor Prefect (only
``dataset()`` imports torch), so a notebook without a GPU stack can read a cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from flows.config import ExperimentConfig, load_config
from storage.features import FeatureRows, FeatureStore

__all__ = ["CachedSplit", "NotCached", "cached_features"]


class NotCached(LookupError):
    """The split's features are not in the cache (the message says which command computes them)."""


@dataclass(frozen=True)
class CachedSplit:
    """One split's cached features of one layer; ``X`` is read on first use (checksum-verified)."""

    experiment: str
    split: str
    layer: str
    key: str
    path: Path
    rows: FeatureRows = field(repr=False)
    ids: list[str] = field(repr=False)

    @property
    def y(self) -> np.ndarray:
        """Class indices into :attr:`classes`, one per row."""
        return self.rows.labels

    @property
    def classes(self) -> list[str]:
        return self.rows.classes

    @cached_property
    def X(self) -> np.ndarray:  # noqa: N802 (the usual name of a feature matrix)
        """Every row in memory, in the stored dtype (float16 by default: ``.astype(np.float32)`` to compute)."""
        return self.rows.store.read(self.key, [self.layer]).features[self.layer]

    def chunks(self, rows: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, block)`` in row order, the checksum verified on the way: memory stays at one block."""
        return self.rows.chunks(rows)

    def dataset(self, dtype: Any = np.float32):
        """A ``torch.utils.data.TensorDataset`` of (features as ``dtype``, label) for your own training loop."""
        import torch

        return torch.utils.data.TensorDataset(torch.from_numpy(np.ascontiguousarray(self.X, dtype=dtype)),
                                              torch.from_numpy(self.y.astype(np.int64)))


def cached_features(config: str | Path | ExperimentConfig, split: str = "train", layer: str = "penultimate",
                    cache_dir: str | Path | None = None) -> CachedSplit:
    """The cached features of ``split`` for an experiment config (a YAML path or a parsed config).

    Reading computes nothing and runs nothing a config names: a ``source: python`` factory is neither
    imported nor called (as in ``transferpipe plan``); what its key needs comes from what the run that
    extracted the features remembered in the cache.
    """
    from tasks.extract.plan import is_stored
    from tasks.extract.plan import plan_extraction
    from tasks.backbones.source import CodeNotRun, without_user_code

    try:
        with without_user_code():
            if isinstance(config, ExperimentConfig):
                cfg = config.model_copy(update={"cache_dir": Path(cache_dir)}) if cache_dir else config
            else:
                cfg = load_config(config, cache_dir)
            plans = plan_extraction(cfg.data, cfg.backbone, cfg.extract, cfg.cache_dir)
    except CodeNotRun as exc:
        where = "CONFIG" if isinstance(config, ExperimentConfig) else config
        raise NotCached(f"the features of {where} are not known to the cache ({exc}); reading never runs a "
                        f"config's code: `transferpipe extract {where}` computes them") from None
    if split not in plans:
        raise NotCached(f"experiment {cfg.name!r} has no split {split!r}; its splits: {', '.join(plans)}")
    plan = plans[split]
    if not is_stored(plan):
        where = config if not isinstance(config, ExperimentConfig) else "CONFIG"
        raise NotCached(f"the {split} split of {cfg.name!r} is not in the cache {cfg.cache_dir}: "
                        f"`transferpipe extract {where}` computes it")
    store = FeatureStore(cfg.cache_dir)
    return CachedSplit(experiment=cfg.name, split=split, layer=layer, key=plan.key, path=store.path(plan.key),
                       rows=store.rows(plan.key, layer), ids=store.paths(plan.key))
