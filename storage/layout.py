"""The cache folder layout: one method per artifact. No other module spells a cache subfolder (a stage's folder
may be declared by its files class in storage/records.py instead; docs/cache.md has the whole tree).

```
<cache_dir>/
  features/<key>.h5 (.partial, .lock, .used)   feature files      storage/features.py
  features/pieces/<piece key>.h5               pieces of splits    tasks/extract/pieces.py, storage/piece_join.py
  features/quarantine/                         files set aside     storage/h5file.py
  manifests/<dataset id>.json                  images per split    storage/records.py (Records; format: tasks/data/)
  scans/<key>.json                             one shard's samples storage/records.py (Records; tasks/data/)
  datasets/digits-v1[-variant]/                the digits as PNGs  tasks/data/
  backbones/<key>.json                         what a source says  storage/records.py (Records)
  heads/<key>/                                 trained heads       storage/head_store.py
  finetune/<key>/                              fine-tuning runs    storage/checkpoints.py (RunFiles)
  metrics/<key>.json                           one fit's test metrics  storage/records.py (Records)
  scores/<key>.json                            selection scores    storage/records.py (Records)
  select/<experiment>/                         select.md/json      storage/records.py (SelectionFiles)
  runs/<experiment>/<key>/                     reports             storage/records.py (ReportFiles)
  maps/<key>.png                               embedding maps      tasks/evaluate/stage.py
  exports/<key>/                               features out        storage/records.py (ExportFiles)
  indexes/<key>/                               FAISS indexes       storage/records.py (IndexFiles)
  quality/<key>/                               data-quality findings  storage/records.py (QualityFiles)
  results.sqlite                               results registry    storage/results.py
  prefect-records/<task>-<key>-<cache id>      Prefect's records   flows/execution/stage_tasks.py, flows/execution/trusted_records.py
  watch/<experiment>.json                      last announced data flows/operations/watch.py
```

Inside a folder of feature files (the cache's ``features/`` or its ``pieces/``)
the names follow :class:`FeatureFiles`. A split's ``<key>.h5`` joins the pieces
it is made of (HDF5 virtual datasets); a piece may belong to many splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.keys import short


@dataclass(frozen=True)
class FeatureFiles:
    """File names inside one folder of feature files."""

    folder: Path

    def complete(self, key: str) -> Path:
        return self.folder / f"{key}.h5"

    def partial(self, key: str) -> Path:
        return self.folder / f"{key}.h5.partial"

    def lock(self, key: str) -> Path:
        return self.folder / f"{key}.h5.lock"

    def used_marker(self, key: str) -> Path:
        return self.folder / f"{key}.used"

    def tail(self, key: str) -> Path:
        """Which piece ended a split whose first item a tail key names (``storage.keys.tail_key``)."""
        return self.folder / f"{key}.tail.json"

    def quarantine(self) -> Path:
        return self.folder / "quarantine"

    def pieces(self) -> FeatureFiles:
        return FeatureFiles(self.folder / "pieces")

    @staticmethod
    def key_of(path: Path) -> str:
        """The key a feature file (complete or partial) is named after."""
        return path.name.split(".")[0]


@dataclass(frozen=True)
class CacheLayout:
    """Where each artifact lives under one cache folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def features(self) -> FeatureFiles:
        return FeatureFiles(self.root / "features")

    def manifests(self) -> Path:
        return self.root / "manifests"

    def manifest(self, dataset_id: str) -> Path:
        return self.manifests() / f"{dataset_id}.json"

    def shard_scan(self, key: str) -> Path:
        """What a scan found in one WebDataset shard (by its path, size and mtime)."""
        return self.root / "scans" / f"{key}.json"

    def datasets(self) -> Path:
        return self.root / "datasets"

    def backbone(self, key: str) -> Path:
        return self.root / "backbones" / f"{key}.json"

    def heads(self) -> Path:
        return self.root / "heads"

    def head(self, key: str) -> Path:
        return self.heads() / key

    def finetune_runs(self) -> Path:
        return self.root / "finetune"

    def finetune_run(self, key: str) -> Path:
        return self.finetune_runs() / key

    def metrics(self, key: str) -> Path:
        return self.root / "metrics" / f"{key}.json"

    def embedding_map(self, key: str) -> Path:
        """A drawn embedding map, reused by every report of the same features and settings."""
        return self.root / "maps" / f"{key}.png"

    def scores(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.json"


    def stage_folder(self, name: str) -> Path:
        """A stage's own folder, as its files class declares it (storage/records.py: ``StageFiles``)."""
        return self.root / name

    def exports(self) -> Path:
        return self.root / "exports"

    def export(self, key: str) -> Path:
        return self.exports() / key

    def indexes(self) -> Path:
        return self.root / "indexes"

    def index(self, key: str) -> Path:
        return self.indexes() / key

    def index_quarantine(self, key: str, stamp: str) -> Path:
        """Where a damaged index is set aside (``indexes/quarantine/<key>-<time>``)."""
        return self.indexes() / "quarantine" / f"{key}-{stamp}"

    def qualities(self) -> Path:
        return self.root / "quality"

    def quality(self, key: str) -> Path:
        return self.qualities() / key

    def selection(self, experiment: str) -> Path:
        return self.root / "select" / experiment

    def reports(self, experiment: str) -> Path:
        return self.root / "runs" / experiment

    def report(self, experiment: str, key: str) -> Path:
        return self.reports(experiment) / short(key)

    def registry(self) -> Path:
        return self.root / "results.sqlite"

    def watch_state(self, experiment: str) -> Path:
        """What ``transferpipe watch`` last announced for an experiment's data."""
        return self.root / "watch" / f"{experiment}.json"

    def prefect_records(self) -> Path:
        """Prefect's result records of the stage tasks (JSON, keyed by the tasks' cache keys): beside the cache
        they describe, so every machine and Prefect home sharing the cache sees the same hits."""
        return self.root / "prefect-records"
