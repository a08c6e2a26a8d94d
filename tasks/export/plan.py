"""The export plan: the ``export:`` config, one :class:`ExportPlan` per split (its key: the feature key, layer,
format, dtype, row group size and code version) and the result; the stage imports it, never the other way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import ExportFiles
from tasks.declare import Graph, Section, Stage, Unit, Work, against, check_layer, features
from tasks.result import StagePlan, StageResult


class ExportConfig(BaseModel):
    """``export:`` section; ``transferpipe export`` flags override it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    splits: list[str] = Field(default_factory=list, description="splits to export (empty: every split)")
    layer: str = Field("penultimate", description="one of backbone.layers")
    format: Literal["parquet", "npy"] = "parquet"
    dtype: Literal["stored", "float16", "float32"] = Field(
        "stored", description="the embedding's dtype; stored: as extract.dtype cached it")
    row_group_rows: int = Field(16384, ge=1, le=1 << 20, description="rows per Parquet row group (and per read)")


class ExportPlan(StagePlan):
    split: str
    features: str  # the split's feature key
    layer: str
    format: Literal["parquet", "npy"]
    dtype: Literal["stored", "float16", "float32"]
    row_group_rows: int
    cache_dir: Path
    manifest: Path | None = None  # the split's manifest: where each row's image is (the ``path`` column)

    @property
    def files(self) -> ExportFiles:
        return ExportFiles(CacheLayout(self.cache_dir).export(self.key))


class ExportResult(StageResult):
    key: str
    split: str
    format: str
    rows: int
    dim: int
    dtype: str
    folder: Path
    files: dict[str, int] = Field(description="file name: size in bytes")
    rows_written: int = 0
    work_fields: tuple[str, ...] = ("rows_written",)

    @property
    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]


def plan_export(config: ExportConfig, split: str, feature_key: str, cache_dir: Path,
                manifest: Path | None = None) -> ExportPlan:
    spec = keys.export_spec(feature_key, config.layer, config.format, config.dtype, config.row_group_rows)
    return ExportPlan(key=keys.key(spec), spec=spec, split=split, features=feature_key, layer=config.layer,
                      format=config.format, dtype=config.dtype, row_group_rows=config.row_group_rows,
                      cache_dir=cache_dir, manifest=manifest)


def _saved(plan: ExportPlan) -> dict[str, Any] | None:
    """The finished export's result, if every file it lists is there with its size."""
    saved = plan.files.read_result()
    if not saved:
        return None
    folder = plan.files.folder
    ok = all((folder / name).is_file() and (folder / name).stat().st_size == size
             for name, size in saved.get("files", {}).items())
    return saved if ok else None


def is_stored(plan: ExportPlan) -> bool:
    return _saved(plan) is not None


def _plan(config: Any, graph: Graph) -> list[Work]:
    split, wanted = features(graph), config.export or ExportConfig()
    unknown = [s for s in wanted.splits if s not in split]
    if unknown:
        raise ValueError(f"export.splits: no split {unknown[0]!r} in this config; its splits: {', '.join(split)}")
    check_layer(config, "export.layer", wanted.layer)
    plans = [plan_export(wanted, s, split[s].key, config.cache_dir, split[s].manifest)
             for s in wanted.splits or list(split)]
    return [Work(p.split, p, is_stored(p)) for p in plans]


STAGE = Stage("export", _plan, "tasks.export.stage:export_split", "export",
              lambda c, w: f"export-{w.what}-{w.plan.format}", after=("extract",), side_goal=True,
              units=lambda w: [Unit(f"{w.what} {w.plan.format} {w.plan.layer}", w.plan.key, w.stored, w.plan.spec)],
              why=against("export"), stored=is_stored, imports=frozenset({"data"}),
              section=Section("export", ExportConfig | None, Field(
                  None, description="transferpipe export: splits, layer, format (the command's flags override it)")))
