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

from tasks.head_defaults import KNN, LINEAR, LOGISTIC, RIDGE, SVM, softmax
from tasks.runtime import cuda_possible, pick_device

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
        accuracies = [float(np.mean(scores.argmax(1) == yv)) for scores in self._grid_scores(states, Xv)]
        best = int(np.argmax(accuracies))  # ties: the first, i.e. the most regularised
        self.grid_ = [{self.grid_param: v, "val_accuracy": a} for v, a in zip(grid, accuracies)]
        self.best_param_ = grid[best]
        self.val_accuracy_ = accuracies[best]
        refit_on = None
        if self.refit == "train+val" and X_val is not None:
            refit_on = (np.vstack([Xp, self._transform(X_val)]), np.concatenate([y_idx, yv]))
        elif X_val is None and len(grid) > 1:
            refit_on = (Xp, y_idx)  # the holdout was carved from train: use all of it now
        state = self._fit_candidates([self.best_param_], *refit_on, warm=states[best])[0] if refit_on else states[best]
        self._set_state(state)
        return self

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
        d = X.shape[1]
        self.mean_ = X.mean(axis=0) if self.preprocess == "standardize" else np.zeros(d, X.dtype)
        std = X.std(axis=0) if self.preprocess == "standardize" else np.ones(d, X.dtype)
        # near-constant features (dead units) carry no signal: dividing by their tiny std would turn noise
        # into huge weights (measured: 34,000x on a fine-tuned resnet18, which blew up LP-FT)
        typical = np.median(std[std > 0]) if (std > 0).any() else 1.0
        self.scale_ = np.maximum(std, STD_FLOOR * typical).astype(X.dtype)

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

    The grid runs from strong to weak regularisation, each fit warm-started
    from the previous one. ``n_jobs`` > 1 splits the grid into that many
    contiguous runs in parallel threads; each run but the first then starts
    cold, which on 2 cores was slower and stopped short of the best val
    accuracy (benchmarks/heads.py), hence the default of one run.
    """

    grid_param = "C"

    def __init__(self, C=LOGISTIC["C"], preprocess="standardize", refit="train", align="none",
                 max_iter=LOGISTIC["max_iter"], n_jobs=LOGISTIC["n_jobs"], random_state=0):
        self.C, self.preprocess, self.refit = C, preprocess, refit
        self.align = align
        self.max_iter, self.n_jobs, self.random_state = max_iter, n_jobs, random_state

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
        model = LogisticRegression(max_iter=self.max_iter, warm_start=True, random_state=self.random_state)
        if warm is not None:
            model.coef_, model.intercept_ = (a.astype(np.float64) for a in _one_row(warm["coef_"], warm["intercept_"]))
        out = []
        for value in values:
            model.set_params(C=float(value))
            with warnings.catch_warnings():
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

    def __init__(self, alpha=RIDGE["alpha"], preprocess="standardize", refit="train", align="none", random_state=0):
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

    def __init__(self, C=SVM["C"], preprocess="standardize", refit="train", align="none", max_iter=SVM["max_iter"],
                 random_state=0):
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

    def __init__(self, weight_decay=LINEAR["weight_decay"], preprocess="standardize", refit="train", align="none",
                 optimizer=LINEAR["optimizer"], max_iter=LINEAR["max_iter"], epochs=LINEAR["epochs"],
                 batch_size=LINEAR["batch_size"], lr=LINEAR["lr"], device=LINEAR["device"], random_state=0):
        self.weight_decay, self.preprocess, self.refit = weight_decay, preprocess, refit
        self.align = align
        self.optimizer, self.max_iter, self.epochs, self.batch_size, self.lr = optimizer, max_iter, epochs, batch_size, lr
        self.device, self.random_state = device, random_state

    def _fit_candidates(self, grid, X, y, warm=None):
        import torch

        if self.optimizer not in ("lbfgs", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r} is not one of ('lbfgs', 'adamw')")
        device = pick_device(self.device)
        Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
        yt = torch.as_tensor(y, dtype=torch.long, device=device)
        layer = torch.nn.Linear(X.shape[1], len(self.classes_)).to(device)
        generator = torch.Generator(device="cpu").manual_seed(self.random_state)
        with torch.no_grad():
            if warm is not None:
                layer.weight.copy_(torch.as_tensor(warm["coef_"]))
                layer.bias.copy_(torch.as_tensor(warm["intercept_"]))
            else:
                layer.weight.zero_()
                layer.bias.zero_()
        states = []
        for value in grid:
            if self.optimizer == "lbfgs":
                steps = self._lbfgs(layer, Xt, yt, float(value))
            else:
                steps = self._adamw(layer, Xt, yt, float(value), generator)
            states.append({
                "coef_": layer.weight.detach().cpu().numpy().astype(X.dtype),
                "intercept_": layer.bias.detach().cpu().numpy().astype(X.dtype),
                "n_iter_": np.array([max(1, steps)]),
            })
        return states

    def _lbfgs(self, layer, X, y, wd):
        import torch

        opt = torch.optim.LBFGS(layer.parameters(), max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(layer(X), y) + wd / 2 * layer.weight.pow(2).sum()
            loss.backward()
            return loss

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

    def __init__(self, k=KNN["k"], temperature=KNN["temperature"], preprocess=KNN["preprocess"], refit="train",
                 align="none", chunk_size=KNN["chunk_size"], device=KNN["device"], random_state=0):
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

    def _search(self, state, X, k):
        device = "cpu" if self.device == "auto" and not cuda_possible() else pick_device(self.device)
        return knn_search(X, state["bank_"], k, self.chunk_size, device)

    def _proba(self, scores):
        return scores  # already normalised votes


def knn_search(queries, bank, k, chunk_size, device) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of each query's k nearest bank rows, best first.

    Chunked over queries and over the bank with a running top-k: memory is
    O(chunk_size * (chunk_size + k)) whatever the bank's size. On the CPU it runs in numpy (no torch import).
    """
    k = min(k, len(bank))
    if str(device) == "cpu":
        return _knn_numpy(queries, bank, k, chunk_size)
    import torch

    sims = np.empty((len(queries), k), dtype=np.float32)
    index = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), chunk_size):
        q = torch.as_tensor(queries[q0 : q0 + chunk_size], dtype=torch.float32, device=device)
        best_sim = torch.empty((len(q), 0), device=device)
        best_idx = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for b0 in range(0, len(bank), chunk_size):
            b = torch.as_tensor(bank[b0 : b0 + chunk_size], dtype=torch.float32, device=device)
            sim = torch.cat([best_sim, q @ b.T], dim=1)
            idx = torch.cat([best_idx, torch.arange(b0, b0 + len(b), device=device).expand(len(q), -1)], dim=1)
            best_sim, top = sim.topk(min(k, sim.shape[1]), dim=1)
            best_idx = idx.gather(1, top)
        sims[q0 : q0 + len(q)] = best_sim.cpu().numpy()
        index[q0 : q0 + len(q)] = best_idx.cpu().numpy()
    return sims, index


def _knn_numpy(queries, bank, k, chunk_size) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty((len(queries), k), dtype=np.float32)
    index = np.empty((len(queries), k), dtype=np.int64)
    for q0 in range(0, len(queries), chunk_size):
        q = np.asarray(queries[q0 : q0 + chunk_size], dtype=np.float32)
        best_sim, best_idx = np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        for b0 in range(0, len(bank), chunk_size):
            b = np.asarray(bank[b0 : b0 + chunk_size], dtype=np.float32)
            sim = np.concatenate([best_sim, q @ b.T], axis=1)
            idx = np.concatenate([best_idx, np.broadcast_to(np.arange(b0, b0 + len(b)), (len(q), len(b)))], axis=1)
            top = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, sim.shape[1])]
            best_sim, best_idx = np.take_along_axis(sim, top, 1), np.take_along_axis(idx, top, 1)
        sims[q0 : q0 + len(q)], index[q0 : q0 + len(q)] = best_sim, best_idx
    return sims, index


def knn_votes(sims, index, labels, n_classes, temperature) -> np.ndarray:
    """(N, n_classes) class probabilities: exp(similarity / T) summed per class over the neighbours, normalised."""
    votes = np.zeros((len(sims), n_classes), dtype=np.float64)
    weights = np.exp((sims.astype(np.float64) - 1.0) / temperature)  # shifted by the max similarity: no overflow
    np.add.at(votes, (np.arange(len(sims))[:, None], labels[index]), weights)
    return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-300)


HEADS: dict[str, type[GridHead]] = {
    "logistic": LogisticHead, "linear": TorchLinearHead, "knn": KNNHead, "ridge": RidgeHead, "svm": SVMHead,
}
