"""The head estimators by ``kind``: the one list a new head kind is added to (its config goes in
:data:`tasks.heads.configs.CONFIGS`).
"""
from __future__ import annotations

from tasks.heads.grid import GridHead
from tasks.heads.linear import LogisticHead, RidgeHead, SVMHead, TorchLinearHead
from tasks.heads.neighbours import KNNHead, PrototypeHead

HEADS: dict[str, type[GridHead]] = {
    "logistic": LogisticHead, "linear": TorchLinearHead, "knn": KNNHead, "ridge": RidgeHead, "svm": SVMHead,
    "prototype": PrototypeHead,
}
