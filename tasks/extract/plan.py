"""The extraction plan: the ``extract:`` config and one :class:`SplitPlan` per split (scan, fingerprint,
key and pieces; cheap, no backbone pass). The loop and the stage import it, never the other way.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.features import FeatureStore
from storage.keys import feature_key, feature_spec
from storage.layout import CacheLayout
from tasks.backbones.config import BackboneConfig, BackboneSpec, resolve
from tasks.data.config import SOURCES, DataConfig
from tasks.data.manifest import Manifest, build_manifest
from tasks.declare import Graph, Section, Stage, Unit, Work
from tasks.extract.pieces import Piece, plan_pieces
from tasks.extract.why import why_features
from tasks.machine import forward_precision
from tasks.result import StageResult

log = logging.getLogger("transferpipe.extract")


class ExtractConfig(BaseModel):
    """``extract:`` section. Of these, ``dtype`` (storage) and the precision that ``device``, ``amp`` and
    ``cpu_bf16`` give (:func:`tasks.machine.forward_precision`) are in the feature key; workers do not change the
    features, and
    batch size and channels_last only choose the kernels (every forward pass is padded to ``batch_size`` rows),
    whose sums may differ in the last bit: left out of the key on purpose, so another batch size reuses the
    cached bytes. With one setting, an image's features are the same bits whatever shares its batch and
    whichever source cut the batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(128, ge=1, le=65536)
    dtype: Literal["float16", "float32"] = "float16"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    num_workers: int | Literal["auto"] = "auto"
    amp: bool = Field(True, description="autocast (bf16 where supported, else fp16) on CUDA")
    cpu_bf16: bool = Field(False, description=(
        "bf16 autocast when extraction runs on the CPU: 1.3-1.9x fp32 through the stage on an AVX-512 EPYC with "
        "AVX512-BF16 (measured), 2-25x slower without bf16 instructions; precision bf16 in the key"))
    channels_last: bool = Field(True, description="the model and batches in channels_last memory format, on any "
                                                   "device (the CPU too: 1.3-1.5x for ResNets)")
    piece_size: int = Field(1024, ge=1, le=1 << 24, description=(
        "images per cached piece on average (content-defined cuts; WebDataset: a piece is a shard): smaller "
        "pieces re-extract less when a folder or table grows, at more files"))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda, cuda:N")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"num_workers must be >= 0 or 'auto', got {v}")
        return v


class SplitPlan(BaseModel):
    """Everything the stage needs for one split; small, so it can cross a task boundary."""

    model_config = ConfigDict(frozen=True)

    key: str
    split: str
    spec: dict[str, Any]
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    extract: ExtractConfig
    on_bad_image: Literal["error", "skip"]
    pieces: tuple[Piece, ...]


class ExtractResult(StageResult):
    """What the stage returns: where the features are, and what it cost."""

    work_fields: tuple[str, ...] = ("forward_batches",)
    key: str
    split: str
    path: Path
    manifest: Path
    rows: int
    dims: dict[str, int]
    skipped: int
    forward_batches: int


def plan_extraction(
    data: DataConfig, backbone: BackboneConfig, extract: ExtractConfig, cache_dir: Path
) -> dict[str, SplitPlan]:
    """Scan the dataset, resolve the backbone, and compute one feature key per split (by split name)."""
    manifest = build_manifest(data, cache_dir)
    manifest_path = manifest.save(CacheLayout(cache_dir).manifest(manifest.dataset_id))
    spec = resolve(backbone, cache_dir)
    precision = forward_precision(extract.device, extract.amp, extract.cpu_bf16)
    plans = {}
    for split, fp in manifest.fingerprints.items():
        fspec = feature_spec(**spec.key_fields(), dataset=fp, split=split, dtype=extract.dtype, precision=precision)
        plans[split] = SplitPlan(
            key=feature_key(fspec), split=split, spec=fspec, manifest=manifest_path,
            cache_dir=Path(cache_dir), backbone=spec, extract=extract, on_bad_image=data.on_bad_image,
            pieces=plan_pieces(manifest, split, fspec, extract.piece_size),
        )
    return plans


def with_backbone(plan: SplitPlan, backbone: BackboneSpec) -> SplitPlan:
    """The same split's images through another backbone (a fine-tuned checkpoint): its own feature key and
    pieces, cached like any other."""
    manifest = Manifest.load(plan.manifest)
    fields = {k: plan.spec[k] for k in ("dtype", "precision")}
    fspec = feature_spec(**backbone.key_fields(), dataset=manifest.fingerprints[plan.split], split=plan.split, **fields)
    return plan.model_copy(update={"key": feature_key(fspec), "spec": fspec, "backbone": backbone,
                                   "pieces": plan_pieces(manifest, plan.split, fspec, plan.extract.piece_size)})


def store_of(plan: SplitPlan) -> FeatureStore:
    """Where every split's pieces live: ``features/pieces/`` of the plan's cache."""
    return FeatureStore(plan.cache_dir).pieces()


def is_stored(plan: SplitPlan) -> bool:
    """Whether the store holds a complete, sound file for this plan (a bad one is quarantined)."""
    return FeatureStore(plan.cache_dir).lookup(plan.key) is not None


def _plan(config: Any, graph: Graph) -> list[Work]:
    if not SOURCES[config.data.source].labelled:
        raise ValueError(f"data.source {config.data.source!r} has no labels to train on: it reads images to score "
                         "(predict.data); train on imagefolder, csv, table, webdataset or a bundled dataset")
    plans = plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    return [Work(split, plan, is_stored(plan)) for split, plan in plans.items()]


def _why(config: Any, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
    return [why_features(config.cache_dir, w.what, w.plan.manifest, u.spec, w.plan.pieces) for w, u in missing]


STAGE = Stage("extract", _plan, "tasks.extract.stage:extract_split", "extract-split",
              lambda c, w: f"extract-{c.backbone.name}-{w.what}", why=_why,
              section=Section("extract", ExtractConfig, ExtractConfig()), device=lambda p: p.extract.device,
              stored=is_stored, imports=frozenset({"data", "backbones"}))
