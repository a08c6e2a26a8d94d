"""Head estimators on cached features, all with the scikit-learn estimator contract.

Every head shares one life cycle (:class:`GridHead`): check inputs, encode
labels, fit its feature preprocessing (none | standardize | l2) on train only,
fit one candidate per grid value on train, keep the best on the validation
split, optionally refit on train+val. Linear heads end as ``coef_`` and
``intercept_`` scored by the same numpy code, so a head saved as arrays and
loaded back predicts bit-for-bit the same.

Kinds: ``logistic`` (multinomial, C grid with warm starts, CLIP linear-probe
protocol), ``linear`` (torch, full-batch L-BFGS or AdamW, GPU when present,
weight-decay grid), ``knn`` (cosine, temperature-weighted votes as in DINO,
chunked), ``ridge`` and ``svm`` (linear, scikit-learn).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from tasks.softmax import softmax

PREPROCESS = ("none", "standardize", "l2")


ALIGN = ("none", "coral")


STD_FLOOR = 1e-2  # standardisation divides by at least this fraction of the median feature std


def _two_class(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's binary (1, D) form as two rows, so every head scores (N, n_classes)."""
    if coef.shape[0] == 1:
        return np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2], dtype=coef.dtype)
    return coef, intercept


def _one_row(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`_two_class`, for warm-starting scikit-learn's binary models."""
    if coef.shape[0] == 2:
        return (coef[1] - coef[0])[None, :], np.array([intercept[1] - intercept[0]])
    return coef, intercept


def _sym_power(C: np.ndarray, power: float) -> np.ndarray:
    w, v = np.linalg.eigh(C)
    return (v * np.clip(w, 1e-12, None) ** power) @ v.T


def coral_map(source: np.ndarray, target: np.ndarray, eps: float = 1.0):
    """CORAL (Sun et al., 2016): whiten the source covariance, re-colour with the target's, move the mean.

    Fitted on features only (no target labels). ``eps`` regularises both
    covariances (the paper's + I). Returns the map to apply to source-domain data.
    """
    s64, t64 = source.astype(np.float64), target.astype(np.float64)
    d = s64.shape[1]
    cs = np.cov(s64, rowvar=False) + eps * np.eye(d)
    ct = np.cov(t64, rowvar=False) + eps * np.eye(d)
    A = _sym_power(cs, -0.5) @ _sym_power(ct, 0.5)
    mu_s, mu_t = s64.mean(axis=0), t64.mean(axis=0)
    return lambda X: ((X.astype(np.float64) - mu_s) @ A + mu_t).astype(source.dtype)


class GridHead(ClassifierMixin, BaseEstimator):
    """Base class: checks, label encoding, preprocessing, the grid search on validation, arrays.

    Subclasses set ``grid_param`` (the searched hyperparameter), implement
    ``_fit_candidates`` (one fitted state per grid value) and ``_scores``.
    ``fit(X, y, X_val=None, y_val=None)``: without a validation set, 20% of
    the training data (stratified, seeded) is held out for the grid search.
    """

    grid_param: ClassVar[str]
    has_proba: ClassVar[bool] = True

    # ------------------------------------------------------------------ fit
    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, X_target: Any = None) -> GridHead:
        if self.preprocess not in PREPROCESS:
            raise ValueError(f"preprocess={self.preprocess!r} is not one of {PREPROCESS}")
        if self.align not in ALIGN:
            raise ValueError(f"align={self.align!r} is not one of {ALIGN}")
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        if self.align == "coral":
            if X_target is None:
                raise ValueError("align='coral' needs X_target: unlabelled features of the target domain")
            to_target = coral_map(X, np.asarray(X_target, dtype=X.dtype))
            X = to_target(X)
            X_val = None if X_val is None else to_target(np.asarray(X_val, dtype=X.dtype))
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got 1 class ({self.classes_[0]!r})")
        grid = list(getattr(self, self.grid_param))
        if not grid:
            raise ValueError(f"{self.grid_param} needs at least one value")
        self._fit_preprocess(X)
        Xp = self._transform(X)
        if X_val is not None:
            X_val = validate_data(self, X_val, reset=False, dtype=[np.float32, np.float64])
            Xt, yt, Xv, yv = Xp, y_idx, self._transform(X_val), self._encode(y_val)
        else:
            Xt, yt, Xv, yv = self._holdout(Xp, y_idx) if len(grid) > 1 else (Xp, y_idx, Xp, y_idx)
        states = self._fit_candidates(grid, Xt, yt)
        best = self._select(grid, states, Xv, yv)
        refit_on = None
        if self.refit == "train+val" and X_val is not None:
            refit_on = (np.vstack([Xp, self._transform(X_val)]), np.concatenate([y_idx, yv]))
        elif X_val is None and len(grid) > 1:
            refit_on = (Xp, y_idx)  # the holdout was carved from train: use all of it now
        self._set_state(self._final_state(states[best], refit_on or (Xt, yt), refit=refit_on is not None,
                                          single=len(grid) == 1))
        return self

    def _final_state(self, state: dict[str, np.ndarray], data: tuple[np.ndarray, np.ndarray], refit: bool,
                     single: bool) -> dict[str, np.ndarray]:
        """The kept fit: the best candidate (fitted on ``data``), or with ``refit`` fitted again on ``data``
        warm from it."""
        return self._fit_candidates([self.best_param_], *data, warm=state)[0] if refit else state

    def _select(self, grid: list[Any], states: list[dict[str, np.ndarray]], Xv: np.ndarray, yv: np.ndarray) -> int:
        """Score every candidate on val; keep the grid and the best (ties: the first, the most regularised)."""
        accuracies = [float(np.mean(scores.argmax(1) == yv)) for scores in self._grid_scores(states, Xv)]
        best = int(np.argmax(accuracies))
        self.grid_ = [{self.grid_param: v, "val_accuracy": a} for v, a in zip(grid, accuracies)]
        self.best_param_ = grid[best]
        self.val_accuracy_ = accuracies[best]
        return best

    # ------------------------------------------------------------------ fit on a split left on disk
    #: heads that can train on a split bigger than memory (:meth:`fit_rows`)
    streams: ClassVar[bool] = False

    def fit_rows(self, rows: Any, X_val: Any, y_val: Any, chunk_rows: int = 16384) -> GridHead:
        """:meth:`fit` on a :class:`storage.features.FeatureRows` (a split left on disk, stored dtype).

        One streaming pass computes the preprocessing statistics; candidates
        train over chunks, so memory is O(chunk_rows x dim) whatever the split's
        size. The validation split is in memory (it selects the grid value).
        """
        if not self.streams:
            raise TypeError(f"{type(self).__name__} needs its training features in memory")
        if self.align != "none":
            raise ValueError("align: coral needs the training features in memory; use align: none for this split")
        if X_val is None:
            raise ValueError("a head trained on a split bigger than memory selects its grid value on a val split; "
                             "set data.val_fraction > 0")
        if self.refit != "train":
            raise ValueError("refit: train+val is not available for a split bigger than memory; use refit: train")
        self.classes_, y_idx = np.unique(rows.labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes")
        self.n_features_in_ = rows.dim
        self._fit_preprocess_rows(rows, chunk_rows)
        Xv = self._transform(validate_data(self, X_val, reset=False, dtype=[np.float32, np.float64]))
        grid = list(getattr(self, self.grid_param))
        states = self._fit_candidates_rows(grid, rows, y_idx, chunk_rows)
        self._set_state(states[self._select(grid, states, Xv, self._encode(y_val))])
        return self

    def _fit_candidates_rows(self, grid, rows, y, chunk_rows):
        raise NotImplementedError

    def _transformed_chunks(self, rows: Any, chunk_rows: int, verify: bool = False):
        """``(start, float32 block)`` of a FeatureRows, preprocessed as the head's inputs are."""
        for start, block in rows.chunks(chunk_rows, verify=verify):
            yield start, self._transform(block.astype(np.float32))

    def _grid_scores(self, states: list[dict[str, np.ndarray]], X: np.ndarray) -> list[np.ndarray]:
        return [self._scores_with(state, X) for state in states]

    def _encode(self, y: Any) -> np.ndarray:
        y = np.asarray(y)
        idx = np.searchsorted(self.classes_, y)
        idx[idx >= len(self.classes_)] = 0
        unknown = self.classes_[idx] != y
        if unknown.any():
            raise ValueError(f"y_val has labels not seen in training: {sorted(set(y[unknown].tolist()))[:10]}")
        return idx

    def _holdout(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng(self.random_state)
        val = np.zeros(len(y), dtype=bool)
        for label in np.unique(y):
            members = np.flatnonzero(y == label)
            if len(members) >= 2:
                val[rng.choice(members, size=max(1, len(members) // 5), replace=False)] = True
        if not val.any():
            return X, y, X, y
        return X[~val], y[~val], X[val], y[val]

    # ------------------------------------------------------------------ preprocessing
    def _fit_preprocess(self, X: np.ndarray) -> None:
        standardize = self.preprocess == "standardize"
        d = X.shape[1]
        self._set_preprocess(X.mean(axis=0) if standardize else np.zeros(d, X.dtype),
                             X.std(axis=0) if standardize else np.ones(d, X.dtype), X.dtype)

    def _fit_preprocess_rows(self, rows: Any, chunk_rows: int) -> None:
        """The same statistics in one streaming pass (float64 sums, so 1 M rows lose nothing)."""
        if self.preprocess != "standardize":
            self._set_preprocess(np.zeros(rows.dim, np.float32), np.ones(rows.dim, np.float32), np.float32)
            return
        total, squares = np.zeros(rows.dim), np.zeros(rows.dim)
        for _, block in rows.chunks(chunk_rows):  # this first pass also verifies the file's checksum
            block = block.astype(np.float64)
            total += block.sum(axis=0)
            squares += np.square(block).sum(axis=0)
        mean = total / rows.rows
        self._set_preprocess(mean.astype(np.float32), np.sqrt(np.maximum(squares / rows.rows - mean**2, 0)), np.float32)

    def _set_preprocess(self, mean: np.ndarray, std: np.ndarray, dtype: Any) -> None:
        self.mean_ = mean
        # near-constant features (dead units) carry no signal: dividing by their tiny std would turn noise
        # into huge weights (measured: 34,000x on a fine-tuned resnet18, which blew up LP-FT)
        typical = np.median(std[std > 0]) if (std > 0).any() else 1.0
        self.scale_ = np.maximum(std, STD_FLOOR * typical).astype(dtype)

    def _transform(self, X: np.ndarray) -> np.ndarray:
        X = (X - self.mean_) / self.scale_
        if self.preprocess == "l2":
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    # ------------------------------------------------------------------ predict
    def class_scores(self, X: Any) -> np.ndarray:
        """(N, n_classes) scores whose argmax is the prediction (also for two classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self._scores_with(self._get_state(), self._transform(X))

    def decision_function(self, X: Any) -> np.ndarray:
        scores = self.class_scores(X)
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict(self, X: Any) -> np.ndarray:
        best = self.class_scores(X).argmax(axis=1)  # checks fitted first
        return self.classes_[best]

    @available_if(lambda self: self.has_proba)
    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self._proba(self._scores_with(self._get_state(), self._transform(X)))

    def _proba(self, scores: np.ndarray) -> np.ndarray:
        return softmax(scores)

    # ------------------------------------------------------------------ arrays (for saving)
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything learned, as arrays (classes go to JSON: they may be strings)."""
        check_is_fitted(self)
        return {"mean_": self.mean_, "scale_": self.scale_, **self._get_state()}

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray], classes: list[Any], extra: dict[str, Any]) -> GridHead:
        head = cls(**params)
        head.classes_ = np.asarray(classes)
        head.mean_, head.scale_ = arrays["mean_"], arrays["scale_"]
        head.n_features_in_ = int(arrays["mean_"].shape[0])
        head.best_param_ = extra["best_param"]
        head.val_accuracy_ = extra["val_accuracy"]
        head.grid_ = extra["grid"]
        head._set_state({k: v for k, v in arrays.items() if k not in ("mean_", "scale_")})
        return head

    #: the learned attributes besides preprocessing; linear heads: coef_, intercept_ (+ n_iter_)
    state_keys: ClassVar[tuple[str, ...]] = ("coef_", "intercept_", "n_iter_")

    def _get_state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.state_keys}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    @staticmethod
    def _scores_with(state: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return X @ state["coef_"].T + state["intercept_"]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
