"""Backbone registry over torchvision: names, weight resolution and preprocessing, without torch.

A backbone config is resolved into a :class:`BackboneSpec` (cheap: no weights
are loaded) whose ``weights_id`` and ``preprocess`` enter the feature key;
:func:`tasks.models.build` turns a spec into a torch module. Preprocessing
always comes from the weights' own ``transforms()`` unless the config overrides
it. No code path downloads: torchvision weights are read from the torch hub
cache, and a missing file is an error that says which file to put where.

What torchvision says about a model (its names, modules, weights and their
transforms) and the sha256 of a weights file are remembered in the cache
(``backbones/``), keyed by the torchvision version and the file's size and
mtime: loading a config or planning a run then needs neither torch nor torchvision.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from storage.atomic import write_json
from storage.keys import file_sha256, fingerprint
from storage.layout import CacheLayout

if TYPE_CHECKING:
    import torch

PENULTIMATE = "penultimate"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class BackboneError(ValueError):
    """Bad backbone name, weights or layer: the message lists the valid choices."""


class WeightsNotFoundError(BackboneError):
    """torchvision weights that are not in the local torch hub cache."""


@functools.cache
def model_names() -> tuple[str, ...]:
    import torchvision
    from torchvision.models import list_models

    return tuple(list_models(module=torchvision.models))


def _choices(value: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{hint} Valid: {', '.join(valid)}"


def _cache_dir(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("cache_dir")


def _memo(cache_dir: Path | None, what: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered as JSON under ``backbones/`` (per torchvision version) when there is a cache."""
    if cache_dir is None:
        return compute()
    path = CacheLayout(cache_dir).backbone(fingerprint({**what, "torchvision": version("torchvision")}))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        write_json(path, value)
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
    """``backbone:`` section: a torchvision classification model and its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "resnet18"
    weights: str = Field("DEFAULT", description="DEFAULT | an enum name | none | path to a weights file")
    layers: list[str] = Field(default_factory=lambda: [PENULTIMATE], min_length=1)
    init_seed: int = Field(0, description="seed of the random initialisation, with weights: none")
    preprocess: PreprocessConfig = PreprocessConfig()

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str, info: ValidationInfo) -> str:
        names = _memo(_cache_dir(info), {"what": "models"}, lambda: list(model_names()))
        if v not in names:
            raise ValueError(f"unknown torchvision model {v!r}.{_choices(v, names)}")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_path(cls, v: str, info: ValidationInfo) -> str:
        if _looks_like_file(v):
            path = Path(os.path.expanduser(v))
            base = (info.context or {}).get("base_dir")
            return str(path if path.is_absolute() or base is None else Path(base) / path)
        return v

    @model_validator(mode="after")
    def _check_weights_and_layers(self, info: ValidationInfo) -> BackboneConfig:
        cache = _cache_dir(info)
        if not _looks_like_file(self.weights) and self.weights.lower() != "none":
            weights_info(self.name, self.weights, cache)
        names = _memo(cache, {"what": "modules", "name": self.name}, lambda: list(module_names(self.name)))
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


def _looks_like_file(value: str) -> bool:
    return value.endswith(WEIGHT_FILE_SUFFIXES) or "/" in value or value.startswith("~")


def enum_weights(name: str, value: str):
    """The torchvision weights enum member for ``value`` (``DEFAULT`` or a member name)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if value == "DEFAULT":
        return enum.DEFAULT
    short = value.split(".", 1)[1] if value.startswith(enum.__name__ + ".") else value
    if short not in enum.__members__:
        valid = ["DEFAULT", "none", "<path to a weights file>", *enum.__members__]
        raise BackboneError(f"unknown weights {value!r} for {name}.{_choices(short, valid)}")
    return enum[short]


def weights_info(name: str, value: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """The full enum name of torchvision weights and their own preprocessing (remembered in the cache)."""

    def compute() -> dict[str, Any]:
        weights = enum_weights(name, value)
        t = weights.transforms()
        return {"enum": f"{type(weights).__name__}.{weights.name}", "resize": int(t.resize_size[0]),
                "crop": int(t.crop_size[0]), "interpolation": t.interpolation.value, "mean": list(t.mean),
                "std": list(t.std)}

    return _memo(cache_dir, {"what": "weights", "name": name, "weights": value}, compute)


@functools.cache
def module_names(name: str) -> tuple[str, ...]:
    """Module names of a model, built on the meta device (no memory, no weights)."""
    return tuple(n for n, _ in skeleton(name).named_modules())


def skeleton(name: str):
    """The architecture without memory (meta device), for names and shapes."""
    import torch

    try:
        with torch.device("meta"):
            return build_empty(name)
    except (RuntimeError, NotImplementedError):  # a few builders touch data at init
        return build_empty(name)


def build_empty(name: str, **kwargs: Any):
    """The torchvision architecture with no weights loaded."""
    from torchvision.models import get_model

    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)  # scipy-based init is slow and we load weights anyway
    return get_model(name, weights=None, **kwargs)


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
    weights: str  # "none", an enum such as "ResNet18_Weights.IMAGENET1K_V1", or a file path
    weights_id: str  # what enters the key: enum name, "none(seed=N)", or "sha256:<file hash>"
    layers: tuple[str, ...]
    preprocess: Preprocess
    init_seed: int = 0

    def key_fields(self) -> dict[str, Any]:
        return {
            "backbone": self.name, "weights": self.weights_id, "layers": list(self.layers),
            "pooling": "avg", "preprocess": self.preprocess.as_dict(),
        }


def resolve(cfg: BackboneConfig, cache_dir: Path | None = None) -> BackboneSpec:
    """Config → spec. Hashes a local weights file; never loads or downloads weights.

    With ``cache_dir``, what torchvision says and the file's hash are remembered there.
    """
    if cfg.weights.lower() == "none":
        weights, weights_id = "none", f"none(seed={cfg.init_seed})"
        base = weights_info(cfg.name, "DEFAULT", cache_dir)
    elif _looks_like_file(cfg.weights):
        path = Path(cfg.weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights file {path} does not exist")
        st = path.stat()
        digest = _memo(cache_dir, {"what": "sha256", "path": str(path.resolve()), "size": st.st_size,
                                   "mtime_ns": st.st_mtime_ns}, lambda: file_sha256(path))
        weights, weights_id = str(path), "sha256:" + digest
        base = weights_info(cfg.name, "DEFAULT", cache_dir)
    else:
        base = weights_info(cfg.name, cfg.weights, cache_dir)
        weights = weights_id = base["enum"]
    over = cfg.preprocess
    preprocess = Preprocess(
        resize=over.resize or base["resize"], crop=over.crop or base["crop"],
        interpolation=over.interpolation or base["interpolation"],
        mean=tuple(over.mean or base["mean"]), std=tuple(over.std or base["std"]),
    )
    return BackboneSpec(cfg.name, weights, weights_id, tuple(cfg.layers), preprocess, cfg.init_seed)
