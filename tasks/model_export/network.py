"""The exported network: uint8 images in; ``probs``, ``set_mask`` and ``ood_score`` out.

Inside: scale to [0, 1] and normalise (the backbone's mean and std), the frozen backbone's layer, the head's
own preprocessing (its mean and scale, then L2 when it normalises), one linear layer, the temperature, the
conformal set (``lac``: ``p >= 1 - q``; ``aps``: the classes whose ranked mass is within ``q``) and the OOD score
(one minus the largest cosine similarity to the training bank). Resize and centre crop stay outside: an
antialiased resize is not expressed exactly by ONNX's Resize before opset 18 nor identically to PIL's after;
``config.json`` spells the step.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.heads.grid import GridHead
from tasks.softmax import softmax


def exportable_kinds() -> list[str]:
    """Head kinds scored by one linear layer on their preprocessed features (the ones :func:`linear_layer` takes)."""
    from tasks.heads.estimators import HEADS

    return sorted(kind for kind, cls in HEADS.items() if _is_linear(cls))


def _is_linear(cls: type) -> bool:
    own = getattr(cls, "_scores_with", None)
    return own is GridHead.__dict__["_scores_with"].__func__ and set(cls.state_keys) >= {"coef_", "intercept_"} \
        and (not cls.has_proba or cls._proba is GridHead._proba)


def linear_layer(head: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The head's ``coef_`` and ``intercept_`` (its class scores are ``transform(x) @ coef_.T + intercept_`` and its
    probabilities their softmax); any other kind is refused by name, listing the kinds that export."""
    if not _is_linear(type(head)):
        raise ValueError(f"export-model: a {kind} head is not one linear layer and cannot be exported yet; kinds "
                         f"that export: {', '.join(exportable_kinds())}")
    return np.asarray(head.coef_, dtype=np.float32), np.asarray(head.intercept_, dtype=np.float32)


class Exported(nn.Module):
    """Backbone + head + trust, as one module with buffers only (no Python state at run time)."""

    def __init__(self, backbone: nn.Module, layer: str, mean: tuple[float, ...], std: tuple[float, ...], head: Any,
                 kind: str, temperature: float, threshold: float, method: str, bank: np.ndarray) -> None:
        super().__init__()
        self.backbone, self.layer, self.method = backbone, layer, method
        coef, intercept = linear_layer(head, kind)
        self.l2 = head.preprocess == "l2"
        tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.register_buffer("mean", tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", tensor(std).view(1, 3, 1, 1))
        self.register_buffer("head_mean", tensor(head.mean_).view(1, -1))
        self.register_buffer("head_scale", tensor(head.scale_).view(1, -1))
        self.register_buffer("weight", tensor(coef))
        self.register_buffer("bias", tensor(intercept))
        self.register_buffer("temperature", tensor([temperature]))
        self.register_buffer("threshold", tensor([threshold]))
        self.register_buffer("bank", tensor(bank))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images.float() / 255.0 - self.mean) / self.std
        feats = self.backbone(x)[self.layer].float()
        z = (feats - self.head_mean) / self.head_scale
        if self.l2:
            z = z / torch.clamp(torch.linalg.vector_norm(z, dim=1, keepdim=True), min=1e-12)
        probs = torch.softmax((z @ self.weight.T + self.bias) / self.temperature, dim=1)
        if self.method == "lac":
            set_mask = (1.0 - probs) <= self.threshold + 1e-12
        else:
            ranked, order = torch.sort(probs, dim=1, descending=True, stable=True)
            within = torch.cumsum(ranked, dim=1) <= self.threshold + 1e-12
            set_mask = torch.zeros_like(within).scatter(1, order, within)
        unit = feats / torch.clamp(torch.linalg.vector_norm(feats, dim=1, keepdim=True), min=1e-12)
        ood_score = 1.0 - torch.max(unit @ self.bank.T, dim=1).values
        return probs, set_mask, ood_score


def reference(backbone: nn.Module, layer: str, pre: Any, head: Any, temperature: float, threshold: float,
              method: str, bank: np.ndarray, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transferpipe's own path on the same uint8 images: the eager backbone, the head's numpy scores, the
    predict stage's temperature, sets and OOD score (tasks.predict.trust)."""
    from tasks.predict import trust

    with torch.inference_mode():
        feats = backbone(pre.normalize(images))[layer].float().numpy()
    probs = head.predict_proba(feats) if head.has_proba else softmax(head.class_scores(feats))
    probs = trust.scaled(probs, temperature)
    return probs, trust.sets(probs, threshold, method), trust.ood_scores(trust.unit_rows(feats), bank)
