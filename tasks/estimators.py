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

import warnings
from typing import Any, ClassVar

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from scipy.linalg import LinAlgWarning
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.svm import LinearSVC
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from tasks.head_configs import KNNConfig, LinearConfig, LogisticConfig, PrototypeConfig, RidgeConfig, SVMConfig, default
from tasks.softmax import softmax
from tasks.machine import cuda_possible, pick_device

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


class LogisticHead(GridHead):
    """Multinomial logistic regression; C chosen on val from a log grid (CLIP linear-probe protocol).

    The grid runs from strong to weak regularisation, each candidate
    warm-started from the previous one (fast, to choose C). The kept model is
    then fitted from scratch at the chosen C, exactly as
    ``LogisticRegression(C=C, tol=tol, max_iter=max_iter)`` on the head's
    preprocessed features: a warm start stops at ``tol`` near the previous C's
    optimum (measured: 7 L-BFGS iterations where a cold fit needs 130, 1 of
    361 test predictions different), so a candidate is not the model users
    get. ``n_iter_`` is the kept fit's L-BFGS iterations; ``converged_`` is
    False, with a ``ConvergenceWarning``, when ``max_iter`` stopped it.
    ``n_jobs`` > 1 splits the grid into that many contiguous runs in parallel
    threads; each run but the first then starts cold, which on 2 cores was
    slower (benchmarks/heads.py), hence the default of one run.
    """

    grid_param = "C"

    def __init__(self, C=default(LogisticConfig, "C"), preprocess=default(LogisticConfig, "preprocess"),
                 refit=default(LogisticConfig, "refit"), align=default(LogisticConfig, "align"),
                 max_iter=default(LogisticConfig, "max_iter"), tol=default(LogisticConfig, "tol"),
                 n_jobs=default(LogisticConfig, "n_jobs"), random_state=0):
        self.C, self.preprocess, self.refit = C, preprocess, refit
        self.align = align
        self.max_iter, self.tol, self.n_jobs, self.random_state = max_iter, tol, n_jobs, random_state

    def _final_state(self, state, data, refit, single):
        # the one candidate of a one-value grid was a cold fit already
        final = state if single and not refit else self._warm_run([self.best_param_], *data, None)[0]
        self.converged_ = bool(final["n_iter_"][0] < self.max_iter)
        if not self.converged_:
            warnings.warn(f"logistic head: L-BFGS stopped at max_iter={self.max_iter} before converging at "
                          f"C={self.best_param_:g} (tol={self.tol:g}); raise max_iter", ConvergenceWarning,
                          stacklevel=3)
        return final

    def _set_state(self, state):
        super()._set_state(state)
        self.converged_ = bool(state["n_iter_"][0] < self.max_iter)

    def _fit_candidates(self, grid, X, y, warm=None):
        grid = list(grid)
        order = np.argsort(grid)
        n_runs = min(len(grid), effective_n_jobs(self.n_jobs))  # -1: one run per core
        runs = [r for r in np.array_split(order, n_runs) if len(r)]
        fitted = Parallel(n_jobs=len(runs), prefer="threads")(
            delayed(self._warm_run)([grid[i] for i in run], X, y, warm) for run in runs
        )
        states: list[Any] = [None] * len(grid)
        for run, results in zip(runs, fitted):
            for i, state in zip(run, results):
                states[i] = state
        return states

    def _warm_run(self, values, X, y, warm):
        model = LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True, random_state=self.random_state)
        if warm is not None:
            model.coef_, model.intercept_ = (a.astype(np.float64) for a in _one_row(warm["coef_"], warm["intercept_"]))
        out = []
        for value in values:
            model.set_params(C=float(value))
            with warnings.catch_warnings():  # a candidate only chooses C; the kept fit warns (_final_state)
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X, y)
            coef, intercept = _two_class(model.coef_.astype(X.dtype), model.intercept_.astype(X.dtype))
            out.append({"coef_": coef, "intercept_": intercept, "n_iter_": np.array([int(model.n_iter_.max())])})
        return out


class RidgeHead(GridHead):
    """Ridge classifier (one-vs-rest least squares); alpha on val. No calibrated probabilities."""

    grid_param = "alpha"
    has_proba = False
    state_keys = ("coef_", "intercept_")

    def __init__(self, alpha=default(RidgeConfig, "alpha"), preprocess=default(RidgeConfig, "preprocess"),
                 refit=default(RidgeConfig, "refit"), align=default(RidgeConfig, "align"), random_state=0):
        self.alpha, self.preprocess, self.refit, self.random_state = alpha, preprocess, refit, random_state
        self.align = align

    def _fit_candidates(self, grid, X, y, warm=None):
        states = []
        for value in grid:
            with warnings.catch_warnings():  # small alpha on collinear features: expected, val decides
                warnings.simplefilter("ignore", LinAlgWarning)
                model = RidgeClassifier(alpha=float(value)).fit(X, y)
            coef = np.atleast_2d(model.coef_).astype(X.dtype)  # binary: (D,) in some versions, (1, D) in others
            coef, intercept = _two_class(coef, np.atleast_1d(model.intercept_).astype(X.dtype))
            states.append({"coef_": coef, "intercept_": intercept})
        return states


class SVMHead(GridHead):
    """Linear SVM (one-vs-rest, squared hinge); C on val. No calibrated probabilities."""

    grid_param = "C"
    has_proba = False

    def __init__(self, C=default(SVMConfig, "C"), preprocess=default(SVMConfig, "preprocess"), refit=default(SVMConfig, "refit"),
                 align=default(SVMConfig, "align"), max_iter=default(SVMConfig, "max_iter"), random_state=0):
        self.C, self.preprocess, self.refit, self.max_iter, self.random_state = C, preprocess, refit, max_iter, random_state
        self.align = align

    def _fit_candidates(self, grid, X, y, warm=None):
        states = []
        for value in grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                # the dual solver: on 1259 x 512 features it took < 2 s at every C, the primal 28 s at C=1
                model = LinearSVC(C=float(value), dual=True, max_iter=self.max_iter, random_state=self.random_state)
                model.fit(X, y)
            coef, intercept = _two_class(model.coef_.astype(X.dtype), model.intercept_.astype(X.dtype))
            states.append({"coef_": coef, "intercept_": intercept, "n_iter_": np.array([int(model.n_iter_)])})
        return states


class TorchLinearHead(GridHead):
    """A linear layer trained with torch on the cached features (on the GPU when there is one).

    ``optimizer="lbfgs"``: full-batch L-BFGS on the cross-entropy, warm-started
    along the weight-decay grid. ``optimizer="adamw"``: ``epochs`` of minibatch
    AdamW (``batch_size``, ``lr``), the classic "train the last layer" recipe.
    """

    grid_param = "weight_decay"

    def __init__(self, weight_decay=default(LinearConfig, "weight_decay"), preprocess=default(LinearConfig, "preprocess"),
                 refit=default(LinearConfig, "refit"), align=default(LinearConfig, "align"),
                 optimizer=default(LinearConfig, "optimizer"), max_iter=default(LinearConfig, "max_iter"),
                 epochs=default(LinearConfig, "epochs"), batch_size=default(LinearConfig, "batch_size"),
                 lr=default(LinearConfig, "lr"), device=default(LinearConfig, "device"), random_state=0):
        self.weight_decay, self.preprocess, self.refit = weight_decay, preprocess, refit
        self.align = align
        self.optimizer, self.max_iter, self.epochs, self.batch_size, self.lr = optimizer, max_iter, epochs, batch_size, lr
        self.device, self.random_state = device, random_state

    streams = True

    def _fit_candidates(self, grid, X, y, warm=None):
        import torch

        if self.optimizer not in ("lbfgs", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r} is not one of ('lbfgs', 'adamw')")
        device = pick_device(self.device)
        Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
        yt = torch.as_tensor(y, dtype=torch.long, device=device)
        generator = torch.Generator(device="cpu").manual_seed(self.random_state)

        def train(layer, wd):
            if self.optimizer == "lbfgs":
                return self._lbfgs(layer, lambda: [(Xt, yt)], len(yt), wd)
            return self._adamw(layer, Xt, yt, wd, generator)

        return self._grid(grid, X.shape[1], X.dtype, device, warm, train)

    def _fit_candidates_rows(self, grid, rows, y, chunk_rows):
        """Full-batch L-BFGS whose every loss and gradient is a pass over the chunks: the same objective as
        in memory, with memory O(chunk_rows x (dim + classes))."""
        import torch

        if self.optimizer != "lbfgs":
            raise ValueError("optimizer: adamw needs the split in memory; a split bigger than memory trains "
                             "with optimizer: lbfgs")
        device = pick_device(self.device)
        labels = torch.as_tensor(y, dtype=torch.long)

        def batches():
            for start, block in self._transformed_chunks(rows, chunk_rows):
                yield (torch.from_numpy(block).to(device, non_blocking=True),
                       labels[start : start + len(block)].to(device, non_blocking=True))

        return self._grid(grid, rows.dim, np.float32, device, None,
                          lambda layer, wd: self._lbfgs(layer, batches, len(y), wd))

    def _grid(self, grid, dim, dtype, device, warm, train):
        """One candidate per weight decay, each warm-started from the previous one."""
        import torch

        layer = torch.nn.Linear(dim, len(self.classes_)).to(device)
        with torch.no_grad():
            if warm is not None:
                layer.weight.copy_(torch.as_tensor(warm["coef_"]))
                layer.bias.copy_(torch.as_tensor(warm["intercept_"]))
            else:
                layer.weight.zero_()
                layer.bias.zero_()
        states = []
        for value in grid:
            steps = train(layer, float(value))
            states.append({
                "coef_": layer.weight.detach().cpu().numpy().astype(dtype),
                "intercept_": layer.bias.detach().cpu().numpy().astype(dtype),
                "n_iter_": np.array([max(1, steps)]),
            })
        return states

    def _lbfgs(self, layer, batches, n, wd):
        """L-BFGS on mean cross-entropy + wd/2 |W|^2; ``batches()`` yields (x, y) covering the split once."""
        import torch

        opt = torch.optim.LBFGS(layer.parameters(), max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                history_size=lbfgs_history(sum(p.numel() for p in layer.parameters())))

        def closure():
            opt.zero_grad()
            total = layer.weight.new_zeros(())
            for x, y in batches():
                loss = torch.nn.functional.cross_entropy(layer(x), y, reduction="sum") / n
                loss.backward()
                total += loss.detach()
            reg = wd / 2 * layer.weight.pow(2).sum()
            reg.backward()
            return total + reg.detach()

        opt.step(closure)
        return int(opt.state[layer.weight].get("n_iter", 1))

    def _adamw(self, layer, X, y, wd, generator):
        import torch

        opt = torch.optim.AdamW(layer.parameters(), lr=self.lr, weight_decay=wd)
        for _ in range(self.epochs):
            order = torch.randperm(len(y), generator=generator).to(X.device)
            for start in range(0, len(y), self.batch_size):
                idx = order[start : start + self.batch_size]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(layer(X[idx]), y[idx]).backward()
                opt.step()
        return self.epochs * -(-len(y) // self.batch_size)


LBFGS_HISTORY_BYTES = 512 * 2**20


def lbfgs_history(n_params: int) -> int:
    """L-BFGS keeps two float32 vectors per remembered step: torch's 100 steps, fewer when that would pass
    512 MiB (a 2048 x 1,000 probe: 32 steps, not 1.6 GiB), never fewer than 10."""
    return int(min(100, max(10, LBFGS_HISTORY_BYTES // (8 * max(n_params, 1)))))


class KNNHead(GridHead):
    """k nearest neighbours by cosine similarity with temperature-weighted votes (DINO).

    Features are L2-normalised (after the optional standardisation); the
    neighbour search runs in chunks of queries and of the bank, keeping a
    running top-k, so the bank may be larger than one similarity matrix fits
    in memory. ``k`` is chosen on val from the list: one search at max(k)
    serves every candidate.
    """

    grid_param = "k"
    state_keys = ("bank_", "bank_labels_", "k_", "n_classes_", "temperature_")
    streams = True
    #: a bank left on disk (fit_rows): the FeatureRows it is read from; saved as a reference, not copied
    bank_rows_: Any = None

    def __init__(self, k=default(KNNConfig, "k"), temperature=default(KNNConfig, "temperature"),
                 preprocess=default(KNNConfig, "preprocess"), refit=default(KNNConfig, "refit"), align=default(KNNConfig, "align"),
                 chunk_size=default(KNNConfig, "chunk_size"), device=default(KNNConfig, "device"), random_state=0):
        self.k, self.temperature, self.preprocess, self.refit = k, temperature, preprocess, refit
        self.align = align
        self.chunk_size, self.device, self.random_state = chunk_size, device, random_state

    def _transform(self, X):
        X = super()._transform(X)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def _fit_candidates(self, grid, X, y, warm=None):
        if min(grid) < 1 or self.temperature <= 0:
            raise ValueError(f"k must be >= 1 and temperature > 0, got k={list(grid)}, temperature={self.temperature}")
        n_classes = len(self.classes_)
        return [{"bank_": X, "bank_labels_": y.astype(np.int64), "k_": np.array([int(k)]),
                 "n_classes_": np.array([n_classes]), "temperature_": np.array([self.temperature])} for k in grid]

    def _scores_with(self, state, X):
        sims, idx = self._search(state, X, int(state["k_"][0]))
        return knn_votes(sims, idx, state["bank_labels_"], int(state["n_classes_"][0]), float(state["temperature_"][0]))

    def _grid_scores(self, states, X):
        k_max = max(int(s["k_"][0]) for s in states)
        sims, idx = self._search(states[0], X, k_max)  # sorted: the first k columns are the k nearest
        return [knn_votes(sims[:, : int(s["k_"][0])], idx[:, : int(s["k_"][0])], s["bank_labels_"],
                          int(s["n_classes_"][0]), float(s["temperature_"][0])) for s in states]

    def _fit_candidates_rows(self, grid, rows, y, chunk_rows):
        self.bank_rows_ = rows
        states = self._fit_candidates(grid, np.empty((0, rows.dim), np.float32), y)
        for state in states:
            del state["bank_"]  # the bank stays in its feature file
        return states

    def _get_state(self):
        if self.bank_rows_ is None:
            return super()._get_state()
        return {k: getattr(self, k) for k in self.state_keys if k != "bank_"}

    def _search(self, state, X, k):
        device = "cpu" if self.device == "auto" and not cuda_possible() else pick_device(self.device)
        if "bank_" in state:
            return knn_search(X, state["bank_"], k, self.chunk_size, device)
        rows = self.bank_rows_
        if rows is None:
            raise ValueError("this kNN head's bank is a feature file: load it with tasks.heads.load_head")
        return knn_search(X, lambda: self._transformed_chunks(rows, self.chunk_size), k, self.chunk_size, device,
                          bank_rows=rows.rows)

    def _proba(self, scores):
        return scores  # already normalised votes


def knn_search(queries, bank, k, chunk_size, device, bank_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of each query's k nearest bank rows, best first.

    ``bank``: an array, or a callable returning an iterable of ``(start, block)``
    chunks (a bank left on disk: :class:`storage.features.FeatureRows`), then
    with ``bank_rows`` its length. The bank is read once, chunk by chunk, each
    chunk scored against every query chunk with a running top-k: memory is
    O(queries x k + chunk_size^2) whatever the bank's size. On the CPU it runs
    in numpy (no torch import), elsewhere in torch (:func:`knn_torch`, which also runs on the CPU, so the
    tests compare the two here).
    """
    if callable(bank):
        chunks, n_bank = bank, int(bank_rows)
    else:
        chunks, n_bank = (lambda: ((b0, bank[b0 : b0 + chunk_size]) for b0 in range(0, len(bank), chunk_size))), len(bank)
    k = min(k, n_bank)
    if str(device) == "cpu":
        return _knn_numpy(queries, chunks, k, chunk_size)
    return knn_torch(queries, chunks, k, chunk_size, device)


def knn_torch(queries, chunks, k, chunk_size, device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_search`'s torch path on ``device``: ``chunks()`` yields ``(start, block)`` of the bank;
    ``k`` at most the bank's length."""
    import torch

    starts = range(0, len(queries), chunk_size)
    qs = [torch.as_tensor(queries[q0 : q0 + chunk_size], dtype=torch.float32, device=device) for q0 in starts]
    best = [(torch.empty((len(q), 0), device=device), torch.empty((len(q), 0), dtype=torch.long, device=device))
            for q in qs]
    for b0, block in chunks():
        b = torch.as_tensor(np.asarray(block), dtype=torch.float32, device=device)
        ids = torch.arange(b0, b0 + len(b), device=device)
        for i, q in enumerate(qs):
            sim = torch.cat([best[i][0], q @ b.T], dim=1)
            idx = torch.cat([best[i][1], ids.expand(len(q), -1)], dim=1)
            top_sim, top = sim.topk(min(k, sim.shape[1]), dim=1)
            best[i] = (top_sim, idx.gather(1, top))
    sims = np.concatenate([s.cpu().numpy() for s, _ in best]) if best else np.empty((0, k), np.float32)
    index = np.concatenate([i.cpu().numpy() for _, i in best]) if best else np.empty((0, k), np.int64)
    return sims, index


def _knn_numpy(queries, chunks, k, chunk_size) -> tuple[np.ndarray, np.ndarray]:
    starts = range(0, len(queries), chunk_size)
    qs = [np.asarray(queries[q0 : q0 + chunk_size], dtype=np.float32) for q0 in starts]
    best = [(np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)) for q in qs]
    for b0, block in chunks():
        b = np.asarray(block, dtype=np.float32)
        for i, q in enumerate(qs):
            # the chunk's own top k first (no index matrix the size of the chunk), then merged with the best so far
            sim, idx = _top_k(q @ b.T, None, min(k, len(b)), offset=b0)
            best[i] = _top_k(np.concatenate([best[i][0], sim], axis=1), np.concatenate([best[i][1], idx], axis=1),
                             min(k, best[i][0].shape[1] + sim.shape[1]))
    if not best:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([s for s, _ in best]), np.concatenate([i for _, i in best])


def _top_k(sim: np.ndarray, idx: np.ndarray | None, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k largest similarities, ties broken by the lower bank index (as a stable sort would).

    ``idx``: each column's bank index, or None for ``offset + column``. Preselects
    2k candidates with ``argpartition`` (linear time) and sorts only those; a row
    whose k-th value ties with the candidates' last is sorted in full.
    """
    def index(rows, cols):
        return cols + offset if idx is None else np.take_along_axis(idx[rows], cols, 1)

    every = slice(None)
    m = 2 * k
    if sim.shape[1] <= m:
        cols = np.arange(sim.shape[1]) + offset if idx is None else idx
        order = np.lexsort((np.broadcast_to(cols, sim.shape), -sim), axis=-1)[:, :k]
        return np.take_along_axis(sim, order, 1), index(every, order)
    part = np.argpartition(sim, sim.shape[1] - m, axis=1)[:, -m:]
    cs, ci = np.take_along_axis(sim, part, 1), index(every, part)
    order = np.lexsort((ci, -cs), axis=-1)
    cs, ci = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)
    unsure = np.flatnonzero(cs[:, k - 1] <= cs[:, m - 1])  # a tie may reach past the candidates
    if len(unsure):
        cols = np.broadcast_to(np.arange(sim.shape[1]) + offset, (len(unsure), sim.shape[1])) if idx is None \
            else idx[unsure]
        full = np.lexsort((cols, -sim[unsure]), axis=-1)[:, :m]
        cs[unsure], ci[unsure] = np.take_along_axis(sim[unsure], full, 1), np.take_along_axis(cols, full, 1)
    return cs[:, :k], ci[:, :k]


def knn_votes(sims, index, labels, n_classes, temperature) -> np.ndarray:
    """(N, n_classes) class probabilities: exp(similarity / T) summed per class over the neighbours, normalised."""
    votes = np.zeros((len(sims), n_classes), dtype=np.float64)
    weights = np.exp((sims.astype(np.float64) - 1.0) / temperature)  # shifted by the max similarity: no overflow
    np.add.at(votes, (np.arange(len(sims))[:, None], labels[index]), weights)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)


class PrototypeHead(GridHead):
    """Nearest class mean by cosine ("SimpleShot", Wang et al. 2019): features (after the optional
    preprocessing) are centred on the training mean (``centre: target``: the mean of the unlabelled target
    features) and L2-normalised; each class is the normalised mean of its training features; scores are
    cosines divided by a temperature. Nothing is fitted by optimisation, so it is as good with one label per
    class as the features allow.

    The temperature does not change which class wins, only how sure the probabilities are: it is chosen on
    validation by log-loss, not by accuracy. The scores are linear in the transformed features (``coef_`` =
    prototypes / temperature), so it saves, loads and predicts as the linear heads do.
    """

    grid_param = "temperature"
    state_keys = ("coef_", "intercept_", "centre_")

    def __init__(self, temperature=default(PrototypeConfig, "temperature"), preprocess=default(PrototypeConfig, "preprocess"),
                 centre=default(PrototypeConfig, "centre"), refit=default(PrototypeConfig, "refit"),
                 align=default(PrototypeConfig, "align"), random_state=0):
        self.temperature, self.preprocess, self.centre, self.refit = temperature, preprocess, centre, refit
        self.align, self.random_state = align, random_state

    def fit(self, X, y, X_val=None, y_val=None, X_target=None):
        if self.centre not in ("train", "target"):
            raise ValueError(f"centre={self.centre!r} is not one of ('train', 'target')")
        if self.centre == "target" and X_target is None:
            raise ValueError("centre='target' needs X_target: unlabelled features of the target domain")
        self._target = X_target
        try:
            return super().fit(X, y, X_val, y_val, X_target)
        finally:
            self._target = None

    def _fit_preprocess(self, X):
        super()._fit_preprocess(X)
        base = X if self.centre == "train" else np.asarray(self._target, dtype=X.dtype)
        self.centre_ = super()._transform(base).mean(axis=0).astype(X.dtype)

    def _transform(self, X):
        X = super()._transform(X) - self.centre_
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def _fit_candidates(self, grid, X, y, warm=None):
        if min(grid) <= 0:
            raise ValueError(f"temperature needs values > 0, got {list(grid)}")
        n_classes = len(self.classes_)
        sums = np.zeros((n_classes, X.shape[1]), dtype=np.float64)
        np.add.at(sums, y, X)
        means = sums / np.maximum(np.bincount(y, minlength=n_classes), 1)[:, None]
        prototypes = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return [{"coef_": (prototypes / t).astype(X.dtype), "intercept_": np.zeros(n_classes, X.dtype),
                 "centre_": self.centre_} for t in grid]

    def _select(self, grid, states, Xv, yv):
        """The temperature with the lowest validation log-loss (ties: the first); accuracy is the same for all."""
        losses, accuracies = [], []
        for scores in self._grid_scores(states, Xv):
            proba = softmax(scores.astype(np.float64))
            losses.append(float(-np.mean(np.log(np.maximum(proba[np.arange(len(yv)), yv], 1e-300)))))
            accuracies.append(float(np.mean(scores.argmax(1) == yv)))
        best = int(np.argmin(losses))
        self.grid_ = [{self.grid_param: v, "val_accuracy": a, "val_log_loss": loss}
                      for v, a, loss in zip(grid, accuracies, losses)]
        self.best_param_ = grid[best]
        self.val_accuracy_ = accuracies[best]
        return best


HEADS: dict[str, type[GridHead]] = {
    "logistic": LogisticHead, "linear": TorchLinearHead, "knn": KNNHead, "ridge": RidgeHead, "svm": SVMHead,
    "prototype": PrototypeHead,
}
