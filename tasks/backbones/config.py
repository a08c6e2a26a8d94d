"""Backbone configs and specs, without torch: which network, which weights, which layers, how to preprocess.

A backbone config is resolved into a :class:`BackboneSpec` (cheap: no weights
are loaded) whose ``key_fields`` enter the feature key; :func:`tasks.backbones.models.build`
turns a spec into a torch module. What differs between torchvision, timm and
the user's own factory lives in :mod:`tasks.backbones.sources`. Preprocessing always
comes from the weights' own definition unless the config overrides it. No code
path downloads: named weights are read from the local caches, and a missing
file is an error that says which file to put where.

What a source says about a model (its names, modules, weights and their
preprocessing) and the sha256 of a weights or factory file are remembered in
the cache (``backbones/``), keyed by the library version and the file's size
and mtime: loading a config or planning a run then needs neither torch nor the
model library.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from storage.keys import backbone_memo_key, file_sha256
from storage.layout import CacheLayout
from storage.records import Records
from tasks.backbones.source import PREPROCESS_FIELDS, BackboneError, CodeNotRun, Source
from tasks.backbones.sources import SOURCES, get

if TYPE_CHECKING:
    import torch


PENULTIMATE = "penultimate"


WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context or {}


def _memo(cache_dir: Path | None, what: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered as JSON under ``backbones/`` when there is a cache.

    ``what`` must name everything the answer depends on (the source's library
    version or the factory file's size and mtime: :meth:`tasks.backbones.source.Source.identity`).
    """
    if cache_dir is None:
        return compute()
    memos, key = Records(CacheLayout(cache_dir).backbone), backbone_memo_key(what)
    if isinstance(memo := memos.read(key), dict) and "value" in memo:  # {"value": null} is an answer too
        return memo["value"]
    value = compute()
    try:
        memos.write(key, {"value": value})
    except OSError:
        pass  # a read-only cache only costs the speed-up
    return value


class PreprocessConfig(BaseModel):
    """Overrides of the weights' own preprocessing; unset fields keep the weights' value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int | None = Field(None, ge=1)
    crop: int | None = Field(None, ge=1)
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @field_validator("std")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"std values must be > 0, got {list(v)}")
        return v


class BackboneConfig(BaseModel):
    """``backbone:`` section: a network from torchvision, timm or your own factory, and its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal[tuple(SOURCES)] = "torchvision"  # the registry's names (tasks/backbones/sources.py)
    search_path: list[str] = Field(default_factory=lambda: ["."], validate_default=True,
                                   description="python source: folders searched first for the factory's module, "
                                               "relative to the config's folder")
    name: str = Field("resnet18", description="torchvision/timm model name, or package.module:factory for python")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="timm.create_model or factory arguments")
    weights: str = Field("DEFAULT", description="DEFAULT | an enum name | none | path to a weights file")
    layers: list[str] = Field(default_factory=lambda: [PENULTIMATE], min_length=1)
    init_seed: int = Field(0, description="seed of the random initialisation, with weights: none")
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("search_path")
    @classmethod
    def _absolute(cls, v: list[str], info: ValidationInfo) -> list[str]:
        base = Path(_context(info).get("base_dir") or Path.cwd())
        return [str((base / os.path.expanduser(p)).resolve()) for p in v]

    @field_validator("name")
    @classmethod
    def _known_name(cls, v: str, info: ValidationInfo) -> str:
        source = info.data.get("source", "torchvision")
        src = get(source, tuple(info.data.get("search_path") or ()))
        try:
            _memo(_context(info).get("cache_dir"), {"what": "check", "source": source, "name": v,
                                                     **src.identity(v, {})}, lambda: src.check(v))
        except CodeNotRun:
            pass  # a dry run checks no code it may not run: the first run checks it
        except BackboneError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("weights")
    @classmethod
    def _weights_path(cls, v: str, info: ValidationInfo) -> str:
        if _looks_like_file(v):
            path = Path(os.path.expanduser(v))
            base = _context(info).get("base_dir")
            return str(path if path.is_absolute() or base is None else Path(base) / path)
        return v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> BackboneConfig:
        cache = _context(info).get("cache_dir")
        src = get(self.source, tuple(self.search_path))
        if self.kwargs and not src.takes_kwargs:
            takers = " or ".join(name for name, s in SOURCES.items() if s.takes_kwargs)
            raise ValueError(f"backbone.kwargs applies to source {takers}, not {self.source}")
        try:
            if not _looks_like_file(self.weights) and self.weights.lower() != "none":
                _named_weights(src, self.name, self.weights, cache)
            names = module_names(self, cache)
        except CodeNotRun:
            return self  # as above: the layers are checked by the first run, before anything computes
        except BackboneError as exc:
            raise ValueError(str(exc)) from None
        bad = [layer for layer in self.layers if layer != PENULTIMATE and layer not in names]
        if bad:
            top = [n for n in names if n and "." not in n]
            raise ValueError(
                f"unknown layer(s) {bad} for {self.name}; use {PENULTIMATE!r} or a module name "
                f"(dotted names reach inside blocks). Top-level modules: {', '.join(top)}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers has duplicates: {self.layers}")
        return self


def module_names(cfg: BackboneConfig, cache_dir: Path | None) -> list[str]:
    """Every module name of the backbone (dotted), as its source says; remembered in the cache."""
    src = get(cfg.source, tuple(cfg.search_path))
    ident = {"source": cfg.source, "name": cfg.name, "kwargs": cfg.kwargs, **src.identity(cfg.name, cfg.kwargs)}
    return _memo(cache_dir, {"what": "modules", **ident}, lambda: src.modules(cfg.name, cfg.kwargs))


def _looks_like_file(value: str) -> bool:
    return value.endswith(WEIGHT_FILE_SUFFIXES) or "/" in value or value.startswith("~")


def _named_weights(src: Source, name: str, weights: str, cache_dir: Path | None) -> str:
    """What the key says for named weights; their file must be on this machine when the source keeps one."""
    ident = {"what": "named-weights", "source": src.name, "name": name, "weights": weights, **src.identity(name, {})}
    resolved, path = _memo(cache_dir, ident, lambda: [str(x) if x else None for x in src.named_weights(name, weights)])
    if path is None:
        return resolved
    if not Path(path).is_file():  # the cache moved on since it was remembered: ask again
        resolved, path = src.named_weights(name, weights)
    return resolved


def file_digest(path: Path, cache_dir: Path | None) -> str:
    """A weights or factory file's sha256, remembered in the cache by its path, size and mtime."""
    st = path.stat()
    return _memo(cache_dir, {"what": "sha256", "path": str(path.resolve()), "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns}, lambda: file_sha256(path))


def _preprocessing(src: Source, cfg: BackboneConfig, weights: str, cache_dir: Path | None) -> dict[str, Any]:
    ident = {"what": "preprocess", "source": cfg.source, "name": cfg.name, "kwargs": cfg.kwargs, "weights": weights,
             **src.identity(cfg.name, cfg.kwargs)}
    return _memo(cache_dir, ident, lambda: src.preprocessing(cfg.name, weights, cfg.kwargs))


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side) → center crop → scale to [0, 1] → normalise."""

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def __call__(self, img: Any) -> torch.Tensor:
        """PIL RGB image → uint8 tensor (3, crop, crop); normalisation happens on the device."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = TF.center_crop(img, [self.crop])
        return TF.pil_to_tensor(img)

    def on_tensor(self, img: torch.Tensor) -> torch.Tensor:
        """The same resize and crop on a decoded uint8 (3, H, W) tensor on any device (the GPU decode path,
        :mod:`tasks.extract.gpu_decode`). Pixels differ from the PIL path's by the resampling kernels' rounding."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.center_crop(img, [self.crop])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch on any device → float, normalised."""
        import torch

        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: what it is, where its weights come from, how to preprocess."""

    name: str
    weights: str  # "none", "factory", a torchvision enum such as "ResNet18_Weights.IMAGENET1K_V1", or a file path
    weights_id: str  # what enters the key: enum name, "none(seed=N)", "factory(seed=N)" or "sha256:<file hash>"
    layers: tuple[str, ...]
    preprocess: Preprocess
    init_seed: int = 0
    source: str = "torchvision"
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    code: str | None = None  # python source: sha256 of the factory's module file
    search_path: tuple[str, ...] = ()  # python source: where its module is looked for first (not in the key)
    channels_last: tuple[str, ...] = ()  # layers whose 4-D output is (B, H, W, C), e.g. Swin's stages

    def key_fields(self) -> dict[str, Any]:
        fields = {
            "backbone": self.name, "weights": self.weights_id, "layers": list(self.layers),
            "pooling": "avg", "preprocess": self.preprocess.as_dict(),
        }
        if self.origin().in_key:  # torchvision keys are unchanged since v0.1, so their features are reused
            fields["source"] = {"name": self.source, "kwargs": self.kwargs, "code": self.code}
        if self.channels_last:  # pooled over space since v0.3 (before: over the wrong axes), so recomputed
            fields["channels_last"] = list(self.channels_last)
        return fields

    @property
    def label(self) -> str:
        return self.origin().label(self.name)

    @property
    def weights_file(self) -> Path | None:
        return Path(self.weights) if self.weights_id.startswith("sha256:") else None

    def origin(self) -> Source:
        return get(self.source, self.search_path)


def resolve(cfg: BackboneConfig, cache_dir: Path | None = None) -> BackboneSpec:
    """Config → spec. Hashes local weights and factory files; never loads or downloads weights.

    With ``cache_dir``, what the source says and the files' hashes are remembered there.
    """
    search = tuple(cfg.search_path)
    src = get(cfg.source, search)
    if cfg.weights.lower() == "none":
        weights, weights_id = "none", f"none(seed={cfg.init_seed})"
        base = _preprocessing(src, cfg, "DEFAULT", cache_dir)
    elif _looks_like_file(cfg.weights):
        path = Path(cfg.weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights file {path} does not exist")
        weights, weights_id = str(path), "sha256:" + file_digest(path, cache_dir)
        base = _preprocessing(src, cfg, "DEFAULT", cache_dir)
    else:
        weights = _named_weights(src, cfg.name, cfg.weights, cache_dir)
        weights_id = src.weights_id(weights, cfg.init_seed, lambda path: file_digest(path, cache_dir))
        base = _preprocessing(src, cfg, cfg.weights, cache_dir)
    over = cfg.preprocess
    chosen = {f: getattr(over, f) or base.get(f) for f in PREPROCESS_FIELDS}
    missing = [f for f, v in chosen.items() if v is None]
    if missing:
        raise BackboneError(
            f"backbone.preprocess needs {', '.join(missing)}: {cfg.name} does not define them. Set them in the "
            f"config, or return (module, {{{', '.join(repr(m) + ': ...' for m in missing)}}}) from the factory"
        )
    preprocess = Preprocess(resize=int(chosen["resize"]), crop=int(chosen["crop"]),
                            interpolation=chosen["interpolation"], mean=tuple(chosen["mean"]), std=tuple(chosen["std"]))
    path = src.code_file(cfg.name)
    code = file_digest(path, cache_dir) if path is not None else None
    spec = BackboneSpec(cfg.name, weights, weights_id, tuple(cfg.layers), preprocess, cfg.init_seed,
                        cfg.source, dict(cfg.kwargs), code, search)
    layout = {"what": "channels-last", "source": cfg.source, "name": cfg.name, "kwargs": cfg.kwargs,
              "layers": list(cfg.layers), "crop": preprocess.crop, **src.identity(cfg.name, cfg.kwargs)}
    found = _memo(cache_dir, layout, lambda: src.channels_last(cfg.name, cfg.kwargs, list(cfg.layers), preprocess.crop))
    return replace(spec, channels_last=tuple(found))
