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
    """Head kinds the exported network expresses: one linear layer on their preprocessed features, or kNN."""
    from tasks.heads.estimators import HEADS

    return sorted(kind for kind, cls in HEADS.items() if _form(cls) is not None)


def _form(cls: type) -> str | None:
    """``linear`` (scores ``transform(x) @ coef_.T + intercept_``, probabilities their softmax; the transform the
    base class's or the prototype's centring), ``knn`` (temperature-weighted votes of the k nearest), or None."""
    from tasks.heads.neighbours import KNNHead, PrototypeHead

    if issubclass(cls, KNNHead):
        return "knn"
    linear = getattr(cls, "_scores_with", None) is GridHead.__dict__["_scores_with"].__func__ \
        and set(cls.state_keys) >= {"coef_", "intercept_"} and (not cls.has_proba or cls._proba is GridHead._proba)
    return "linear" if linear and cls._transform in (GridHead._transform, PrototypeHead._transform) else None


def head_form(head: Any, kind: str) -> str:
    """How the head is expressed in the graph (a head may say it: the fine-tuned classifier is ``linear``); any
    other kind is refused by name, listing the kinds that export."""
    form = getattr(head, "form", None) or _form(type(head))
    if form is None:
        raise ValueError(f"export-model: a {kind} head cannot be exported yet; kinds that export: "
                         f"{', '.join(exportable_kinds())}")
    return form


class Exported(nn.Module):
    """Backbone + head + trust, as one module with buffers only (no Python state at run time)."""

    def __init__(self, backbone: nn.Module, layer: str, mean: tuple[float, ...], std: tuple[float, ...], head: Any,
                 kind: str, temperature: float, threshold: float, method: str, bank: np.ndarray,
                 penalty: tuple[float, int] = (0.0, 0)) -> None:
        super().__init__()
        self.backbone, self.layer, self.method = backbone, layer, method
        self.form = head_form(head, kind)
        self.l2 = head.preprocess == "l2"
        tensor = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.register_buffer("mean", tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", tensor(std).view(1, 3, 1, 1))
        self.register_buffer("head_mean", tensor(head.mean_).view(1, -1))
        self.register_buffer("head_scale", tensor(head.scale_).view(1, -1))
        centre = getattr(head, "centre_", None)  # the prototype head centres and L2-normalises after
        self.centred = centre is not None
        self.register_buffer("centre", tensor(centre if self.centred else [0.0]).view(1, -1))
        if self.form == "linear":
            self.register_buffer("weight", tensor(head.coef_))
            self.register_buffer("bias", tensor(head.intercept_))
        else:  # kNN: the bank as the head searches it (transformed, unit rows), its labels, k and temperature
            if getattr(head, "bank_", None) is None:
                raise ValueError("export-model: this kNN head's bank stays in its feature file (a training split "
                                 "above the memory budget) and is not exported; choose a linear head")
            self.register_buffer("neighbours", tensor(head._transform(np.asarray(head.bank_, dtype=np.float32))))
            self.register_buffer("neighbour_labels", torch.as_tensor(np.asarray(head.bank_labels_, dtype=np.int64)))
            self.k, self.classes = min(int(head.k_[0]), len(head.bank_)), int(head.n_classes_[0])
            self.vote_temperature = float(head.temperature_[0])
        self.register_buffer("temperature", tensor([temperature]))
        self.register_buffer("threshold", tensor([threshold]))
        self.register_buffer("bank", tensor(bank))
        self.lam, self.k_reg = penalty if method == "raps" else (0.0, 0)  # RAPS: lambda * max(0, rank - k_reg)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (images.float() / 255.0 - self.mean) / self.std
        feats = self.backbone(x)[self.layer].float()
        z = (feats - self.head_mean) / self.head_scale
        if self.l2:
            z = z / torch.clamp(torch.linalg.vector_norm(z, dim=1, keepdim=True), min=1e-12)
        if self.centred or self.form == "knn":
            z = z - self.centre if self.centred else z
            z = z / torch.clamp(torch.linalg.vector_norm(z, dim=1, keepdim=True), min=1e-12)
        if self.form == "linear":
            probs = torch.softmax((z @ self.weight.T + self.bias) / self.temperature, dim=1)
        else:
            sims, index = torch.topk(z @ self.neighbours.T, self.k, dim=1)
            weights = torch.exp((sims.double() - 1.0) / self.vote_temperature)
            votes = torch.zeros(z.shape[0], self.classes, dtype=torch.float64, device=z.device)
            votes = votes.scatter_add(1, self.neighbour_labels[index], weights)
            votes = votes / torch.clamp(votes.sum(dim=1, keepdim=True), min=1e-300)
            probs = torch.softmax(torch.log(torch.clamp(votes, min=1e-12)) / self.temperature, dim=1).float()
        if self.method == "lac":
            set_mask = (1.0 - probs) <= self.threshold + 1e-12
        else:
            ranked, order = torch.sort(probs, dim=1, descending=True, stable=True)
            ranks = torch.arange(1, probs.shape[1] + 1, device=probs.device, dtype=probs.dtype)
            within = torch.cumsum(ranked, dim=1) + self.lam * torch.clamp(ranks - self.k_reg, min=0) \
                <= self.threshold + 1e-12
            set_mask = torch.zeros_like(within).scatter(1, order, within)
        unit = feats / torch.clamp(torch.linalg.vector_norm(feats, dim=1, keepdim=True), min=1e-12)
        ood_score = 1.0 - torch.max(unit @ self.bank.T, dim=1).values
        return probs, set_mask, ood_score


def reference(backbone: nn.Module, layer: str, pre: Any, head: Any, temperature: float, threshold: float,
              method: str, bank: np.ndarray, images: torch.Tensor, penalty: tuple[float, int] = (0.0, 0)
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transferpipe's own path on the same uint8 images: the eager backbone, the head's numpy scores, the
    predict stage's temperature, sets and OOD score (tasks.predict.trust)."""
    from tasks.predict import trust

    with torch.inference_mode():
        feats = backbone(pre.normalize(images))[layer].float().numpy()
    probs = head.predict_proba(feats) if head.has_proba else softmax(head.class_scores(feats))
    probs = trust.scaled(probs, temperature)
    return probs, trust.sets(probs, threshold, method, penalty), trust.ood_scores(trust.unit_rows(feats), bank)
