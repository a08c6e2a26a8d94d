"""The backbone as a torch module: weights loaded (never downloaded), classifier dropped, feature layers hooked.

:mod:`tasks.backbones` resolves a config into a :class:`~tasks.backbones.BackboneSpec`
without torch; this module builds it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torch import nn


from storage import checkpoints
from storage.checkpoints import WeightsFileError
from tasks.backbones import PENULTIMATE, BackboneError, BackboneSpec, WeightsNotFoundError, build_empty, skeleton


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
    head = final_linear(skeleton(spec.name))
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
        model = build_empty(spec.name, **kwargs)
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
