"""Backbone registry over torchvision, weight resolution, preprocessing, feature layers.

A backbone is resolved from its config into a :class:`BackboneSpec` (cheap: no
weights are loaded) whose ``weights_id`` and ``preprocess`` enter the feature
key; :func:`build` turns a spec into a :class:`FeatureExtractor`. Preprocessing
always comes from the weights' own ``transforms()`` unless the config overrides
it. No code path downloads: torchvision weights are read from the torch hub
cache, and a missing file is an error that says which file to put where.
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn
from torchvision.models import get_model, get_model_weights, list_models
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from storage import checkpoints
from storage.checkpoints import WeightsFileError
from storage.keys import file_sha256

PENULTIMATE = "penultimate"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class BackboneError(ValueError):
    """Bad backbone name, weights or layer: the message lists the valid choices."""


class WeightsNotFoundError(BackboneError):
    """torchvision weights that are not in the local torch hub cache."""


@functools.cache
def model_names() -> tuple[str, ...]:
    return tuple(list_models(module=torchvision.models))


def _choices(value: str, valid: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{hint} Valid: {', '.join(valid)}"


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
    def _known_model(cls, v: str) -> str:
        if v not in model_names():
            raise ValueError(f"unknown torchvision model {v!r}.{_choices(v, model_names())}")
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
    def _check_weights_and_layers(self) -> BackboneConfig:
        if not _looks_like_file(self.weights) and self.weights.lower() != "none":
            enum_weights(self.name, self.weights)
        names = module_names(self.name)
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


def enum_weights(name: str, value: str) -> torchvision.models.WeightsEnum:
    enum = get_model_weights(name)
    if value == "DEFAULT":
        return enum.DEFAULT
    short = value.split(".", 1)[1] if value.startswith(enum.__name__ + ".") else value
    if short not in enum.__members__:
        valid = ["DEFAULT", "none", "<path to a weights file>", *enum.__members__]
        raise BackboneError(f"unknown weights {value!r} for {name}.{_choices(short, valid)}")
    return enum[short]


@functools.cache
def module_names(name: str) -> tuple[str, ...]:
    """Module names of a model, built on the meta device (no memory, no weights)."""
    return tuple(n for n, _ in _skeleton(name).named_modules())


def _skeleton(name: str) -> nn.Module:
    """The architecture without memory (meta device), for names and shapes."""
    try:
        with torch.device("meta"):
            return _build_empty(name)
    except (RuntimeError, NotImplementedError):  # a few builders touch data at init
        return _build_empty(name)


def _build_empty(name: str, **kwargs: Any) -> nn.Module:
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)  # scipy-based init is slow and we load weights anyway
    return get_model(name, weights=None, **kwargs)


# --------------------------------------------------------------------------- spec


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
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        img = TF.center_crop(img, [self.crop])
        return TF.pil_to_tensor(img)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch on any device → float, normalised."""
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


def resolve(cfg: BackboneConfig) -> BackboneSpec:
    """Config → spec. Hashes a local weights file; never loads or downloads weights."""
    if cfg.weights.lower() == "none":
        weights, weights_id = "none", f"none(seed={cfg.init_seed})"
        defaults = get_model_weights(cfg.name).DEFAULT
    elif _looks_like_file(cfg.weights):
        path = Path(cfg.weights)
        if not path.is_file():
            raise BackboneError(f"backbone.weights file {path} does not exist")
        weights, weights_id = str(path), "sha256:" + file_sha256(path)
        defaults = get_model_weights(cfg.name).DEFAULT
    else:
        defaults = enum_weights(cfg.name, cfg.weights)
        weights = weights_id = f"{type(defaults).__name__}.{defaults.name}"
    base = defaults.transforms()
    over = cfg.preprocess
    preprocess = Preprocess(
        resize=over.resize or int(base.resize_size[0]),
        crop=over.crop or int(base.crop_size[0]),
        interpolation=over.interpolation or base.interpolation.value,
        mean=tuple(over.mean or base.mean),
        std=tuple(over.std or base.std),
    )
    return BackboneSpec(cfg.name, weights, weights_id, tuple(cfg.layers), preprocess, cfg.init_seed)


# --------------------------------------------------------------------------- weights


def hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps (and looks for) this weights file: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file (never unpickled); a bad file is a BackboneError naming it."""
    try:
        return checkpoints.load_weights_file(path)
    except WeightsFileError as exc:
        raise BackboneError(str(exc)) from None


def _state_dict(spec: BackboneSpec) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The state dict to load and the builder arguments its architecture needs."""
    if spec.weights == "none":
        return None, {}
    if spec.weights_id.startswith("sha256:"):
        return load_weights_file(Path(spec.weights)), {}
    weights = torchvision.models.get_weight(spec.weights)
    path = hub_file(weights)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{spec.weights} is not in the torch hub cache and this machine never downloads. "
            f"Put {weights.url} at {path} (the folder follows $TORCH_HOME), "
            f"or set backbone.weights to a local weights file"
        )
    kwargs: dict[str, Any] = {"num_classes": len(weights.meta["categories"])}
    if spec.name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if spec.name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=True, transform_input=True)
    return load_weights_file(path), kwargs


def source_classifier(spec: BackboneSpec) -> tuple[np.ndarray, np.ndarray] | str:
    """The source model's classifier (weight, bias) from its weights, or why there is none."""
    if spec.weights == "none":
        return "random initialisation: no source classifier"
    state, _ = _state_dict(spec)
    head = final_linear(_skeleton(spec.name))
    w, b = state.get(f"{head}.weight"), state.get(f"{head}.bias")
    if w is None or b is None:
        return f"the weights hold no classifier ({head}.weight)"
    return w.double().numpy(), b.double().numpy()


def final_linear(model: nn.Module) -> str | None:
    """Name of the classifier: the last ``nn.Linear`` in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


# --------------------------------------------------------------------------- model


class FeatureExtractor(nn.Module):
    """Runs the backbone once and returns ``{layer: (B, D) pooled features}``.

    ``penultimate`` is the input of the classifier (the classifier is replaced
    by ``Identity``); named modules are captured with forward hooks and
    globally average-pooled (spatial maps over H, W; token sequences over tokens).
    """

    def __init__(self, model: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.layers = model, layers
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for layer in layers:
            if layer != PENULTIMATE:
                modules[layer].register_forward_hook(functools.partial(self._capture, layer))

    def _capture(self, layer: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured[layer] = pool(output[0] if isinstance(output, tuple) else output)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        out = self.model(x)
        if PENULTIMATE in self.layers:
            self._captured[PENULTIMATE] = pool(out)
        return {layer: self._captured[layer] for layer in self.layers}


def pool(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 4:
        return t.mean(dim=(2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.flatten(1)


def load_model(spec: BackboneSpec, num_classes: int | None = None) -> nn.Module:
    """The torchvision model with the spec's weights on the CPU.

    Its classifier (the last ``nn.Linear``) is dropped from the weights and
    replaced: by ``Identity`` (features), or by a fresh, seeded
    ``Linear(in, num_classes)`` (fine-tuning).
    """
    state, kwargs = _state_dict(spec)
    with torch.random.fork_rng(devices=[]):  # random init is part of the key: make it reproducible
        torch.manual_seed(spec.init_seed)
        model = _build_empty(spec.name, **kwargs)
        head = final_linear(model)
        if head is None and (num_classes or PENULTIMATE in spec.layers):
            raise BackboneError(f"{spec.name} has no final Linear layer, so {PENULTIMATE!r} is undefined; name a module")
        in_features = model.get_submodule(head).in_features if head else 0
        if head is not None:
            model.set_submodule(head, nn.Identity())
        if state is not None:
            state = {k: v for k, v in state.items() if not (head and k.startswith(head + "."))}
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise BackboneError(f"weights {spec.weights} do not fit {spec.name}: {exc}") from exc
        if num_classes is not None:
            model.set_submodule(head, nn.Linear(in_features, num_classes))
    return model


def build(spec: BackboneSpec) -> FeatureExtractor:
    """The frozen feature extractor, in eval mode, weights loaded, on the CPU."""
    return FeatureExtractor(load_model(spec), spec.layers).eval().requires_grad_(False)
