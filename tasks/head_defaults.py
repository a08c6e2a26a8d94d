"""Hyperparameter defaults of every head kind (the one source the estimators and configs read), and softmax.

Kept apart from :mod:`tasks.estimators` so that reading a config imports
neither scikit-learn nor torch.
"""
from __future__ import annotations

import numpy as np

LOGISTIC = {"C": tuple(10.0 ** e for e in range(-6, 7)), "max_iter": 1000, "n_jobs": 1}
LINEAR = {"weight_decay": (0.0, 1e-4, 1e-3, 1e-2, 1e-1), "optimizer": "lbfgs", "max_iter": 200, "epochs": 10,
          "batch_size": 32, "lr": 1e-3, "device": "auto"}
KNN = {"k": (1, 5, 10, 20, 50, 100), "temperature": 0.07, "preprocess": "l2", "chunk_size": 4096, "device": "auto"}
RIDGE = {"alpha": tuple(10.0 ** e for e in range(-2, 5))}
SVM = {"C": tuple(10.0 ** e for e in range(-4, 1)), "max_iter": 2000}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
