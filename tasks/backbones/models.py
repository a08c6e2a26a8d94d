"""The backbone as a torch module: weights loaded (never downloaded), classifier dropped, feature layers hooked.

:mod:`tasks.backbones.config` resolves a config into a :class:`~tasks.backbones.config.BackboneSpec`
without torch; this module builds it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from storage import checkpoints
from storage.checkpoints import WeightsFileError
from tasks.backbones.config import PENULTIMATE, BackboneError, BackboneSpec
from tasks.backbones.sources import get


def hub_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision keeps (and looks for) this weights file: $TORCH_HOME/hub/checkpoints/."""
    return get("torchvision").hub_file(f"{type(weights).__name__}.{weights.name}")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a local weights file (never unpickled); a bad file is a BackboneError naming it."""
    try:
        return checkpoints.load_weights_file(path)
    except WeightsFileError as exc:
        raise BackboneError(str(exc)) from None


def _state_dict(spec: BackboneSpec) -> dict[str, torch.Tensor] | None:
    """The state dict to load over the built architecture (None: as built)."""
    if spec.weights in ("none", "factory"):
        return None
    return load_weights_file(spec.weights_file or spec.origin().weights_file(spec.weights))


def _architecture(spec: BackboneSpec) -> nn.Module:
    """The architecture its weights need (torchvision enums: their class count), no weights loaded."""
    return spec.origin().build(spec.name, spec.kwargs, "file" if spec.weights_file else spec.weights)


def source_classifier(spec: BackboneSpec) -> tuple[np.ndarray, np.ndarray] | str:
    """The source model's classifier (weight, bias) from its weights, or why there is none."""
    if spec.weights == "none":
        return "random initialisation: no source classifier"
    state = _state_dict(spec)
    if state is None:  # the factory built it with its weights
        model = _architecture(spec)
        state = model.state_dict()
        head = classifier(spec, model)
    else:
        head = classifier(spec, spec.origin().skeleton(spec.name, spec.kwargs))  # names only: no memory
    w, b = state.get(f"{head}.weight"), state.get(f"{head}.bias")
    if w is None or b is None:
        return f"the weights hold no classifier ({head}.weight)"
    return w.double().numpy(), b.double().numpy()


def classifier(spec: BackboneSpec, model: nn.Module) -> str | None:
    """Name of the model's classifier module, as its source defines it."""
    return spec.origin().classifier(model)


# --------------------------------------------------------------------------- model


class FeatureExtractor(nn.Module):
    """Runs the backbone once and returns ``{layer: (B, D) pooled features}``.

    ``penultimate`` is the input of the classifier (the classifier is replaced
    by ``Identity``); named modules are captured with forward hooks and
    globally average-pooled (spatial maps over H, W; token sequences over tokens).
    """

    def __init__(self, model: nn.Module, layers: tuple[str, ...], channels_last: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.model, self.layers, self.channels_last = model, layers, channels_last
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for layer in layers:
            if layer != PENULTIMATE:
                modules[layer].register_forward_hook(functools.partial(self._capture, layer))

    def _capture(self, layer: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured[layer] = pool(output[0] if isinstance(output, tuple) else output, layer in self.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        out = self.model(x)
        if PENULTIMATE in self.layers:
            self._captured[PENULTIMATE] = pool(out, PENULTIMATE in self.channels_last)
        return {layer: self._captured[layer] for layer in self.layers}


def pool(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Global average over space (``(B, C, H, W)``, or ``(B, H, W, C)`` with ``channels_last``) or tokens."""
    if t.ndim == 4:
        return t.mean(dim=(1, 2) if channels_last else (2, 3))
    if t.ndim == 3:
        return t.mean(dim=1)
    return t.flatten(1)


def load_model(spec: BackboneSpec, num_classes: int | None = None) -> nn.Module:
    """The backbone with the spec's weights on the CPU.

    Its classifier is dropped from the weights and replaced: by ``Identity``
    (features), or by a fresh, seeded ``Linear(in, num_classes)`` (fine-tuning).
    A python factory's module without a classifier has its output as the feature.
    """
    state = _state_dict(spec)
    with torch.random.fork_rng(devices=[]):  # random init is part of the key: make it reproducible
        torch.manual_seed(spec.init_seed)
        # features from loaded weights: no random init to overwrite (benchmarks/model_load: ViT-B/16 8.7x faster)
        model = _on_meta(spec) if state is not None and num_classes is None else None
        model = model if model is not None else _architecture(spec)
        head = classifier(spec, model)
        if head is None and (num_classes or (PENULTIMATE in spec.layers and not spec.origin().output_is_feature)):
            raise BackboneError(f"{spec.label} has no final Linear layer, so {PENULTIMATE!r} is undefined; name a module")
        module = model.get_submodule(head) if head else None
        if module is not None and not isinstance(module, nn.Linear):
            raise BackboneError(f"{spec.label}'s classifier {head} is a {type(module).__name__}, not a Linear; "
                                f"name a module in backbone.layers instead of {PENULTIMATE!r}")
        if head is not None:
            model.set_submodule(head, nn.Identity())
        if state is not None:
            state = {k: v for k, v in state.items() if not (head and k.startswith(head + "."))}
            _load(spec, model, state)
        if num_classes is not None:
            model.set_submodule(head, nn.Linear(module.in_features, num_classes))
    return model


def _load(spec: BackboneSpec, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``state`` into ``model`` (strict); a model on the meta device takes the tensors, cast to its dtypes."""
    own = model.state_dict()
    on_meta = any(t.is_meta for t in own.values())
    if on_meta:
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=on_meta)
    except RuntimeError as exc:
        raise BackboneError(f"weights {spec.weights} do not fit {spec.label}: {exc}") from exc


def _on_meta(spec: BackboneSpec) -> nn.Module | None:
    """The architecture on the meta device (no memory, no random init) for weights to be loaded into, or None
    where loading would not give the model a normal build gives: a builder that touches data, buffers the
    weights do not hold (non-persistent ones, computed at init), parameters shared between modules."""
    try:
        with torch.device("meta"):
            model = _architecture(spec)
    except (BackboneError, RuntimeError, NotImplementedError, TypeError, ValueError):  # the normal build says why
        return None
    shared = len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
    persistent = set(model.state_dict())
    computed = any(name not in persistent for name, _ in model.named_buffers())
    return None if shared or computed else model


def build(spec: BackboneSpec) -> FeatureExtractor:
    """The frozen feature extractor, in eval mode, weights loaded, on the CPU."""
    model = load_model(spec)
    return FeatureExtractor(model, spec.layers, frozenset(spec.channels_last)).eval().requires_grad_(False)
