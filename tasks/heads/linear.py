"""The linear heads: ``logistic`` (multinomial, C grid along one warm-started Newton-CG path; the kept model
the chosen candidate continued to a tight tolerance), ``ridge`` and ``svm`` (scikit-learn), and ``linear`` (torch, full-batch L-BFGS or AdamW, GPU
when present, weight-decay grid). All end as ``coef_`` and ``intercept_`` scored by :class:`GridHead`.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs
from scipy.linalg import LinAlgWarning
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.svm import LinearSVC

from tasks.heads.configs import LinearConfig, LogisticConfig, RidgeConfig, SVMConfig, default
from tasks.heads.grid import GridHead, _one_row, _two_class
from tasks.machine import pick_device


class LogisticHead(GridHead):
    """Multinomial logistic regression; C chosen on val from a log grid (CLIP linear-probe protocol).

    The grid runs from strong to weak regularisation along one warm-started path of scikit-learn's Newton-CG
    solver (a few Newton steps per value: measured 3-5x faster than a loop of cold fits over the same grid,
    ``python -m benchmarks.heads``), each candidate stopped at ``tol`` (no gradient component of the mean loss
    above it), which is enough to choose C. L2-regularised logistic regression has one optimum per C, so the
    kept model is the chosen candidate continued, warm, to ``tol / 100``: Newton's steps converge
    quadratically there (1-3 more, measured), and the model is scikit-learn's converged fit at that C
    (``LogisticRegression(C, tol=1e-10)`` on the head's own preprocessed features: the same predictions,
    probabilities within 1e-4, tests/test_heads.py). No cold refit: a warm start and a cold fit run to the
    same tight tolerance reach the same optimum.

    ``n_iter_`` is the kept fit's Newton iterations past its candidate; ``converged_`` is False, with a
    ``ConvergenceWarning``, when ``max_iter`` stopped it. ``n_jobs`` > 1 splits the grid into that many
    contiguous runs in parallel threads; each run but the first then starts cold.
    """

    grid_param = "C"
    solver = "newton-cg"
    polish = 1e-2  # the kept model continues to tol * polish

    def __init__(self, C=default(LogisticConfig, "C"), preprocess=default(LogisticConfig, "preprocess"),
                 refit=default(LogisticConfig, "refit"), align=default(LogisticConfig, "align"),
                 max_iter=default(LogisticConfig, "max_iter"), tol=default(LogisticConfig, "tol"),
                 n_jobs=default(LogisticConfig, "n_jobs"), random_state=0):
        self.C, self.preprocess, self.refit = C, preprocess, refit
        self.align = align
        self.max_iter, self.tol, self.n_jobs, self.random_state = max_iter, tol, n_jobs, random_state

    def _final_state(self, state, data, refit, single):
        final = self._warm_run([self.best_param_], *data, state, tol=self.tol * self.polish)[0]
        self.converged_ = bool(final["n_iter_"][0] < self.max_iter)
        if not self.converged_:
            warnings.warn(f"logistic head: Newton-CG stopped at max_iter={self.max_iter} before converging at "
                          f"C={self.best_param_:g} (tol={self.tol * self.polish:g}); raise max_iter",
                          ConvergenceWarning, stacklevel=3)
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

    def _warm_run(self, values, X, y, warm, tol=None):
        model = LogisticRegression(solver=self.solver, max_iter=self.max_iter, tol=tol or self.tol, warm_start=True,
                                   random_state=self.random_state)
        if warm is not None:
            model.coef_, model.intercept_ = (a.astype(X.dtype) for a in _one_row(warm["coef_"], warm["intercept_"]))
        out = []
        for value in values:
            model.set_params(C=float(value))
            with warnings.catch_warnings():  # a candidate only chooses C; the kept fit warns (_final_state)
                warnings.simplefilter("ignore", ConvergenceWarning)
                # Newton-CG's line search at the precision floor of float32 features: it stops there, as it should
                for message in ("Line Search failed", "The line search algorithm did not converge",
                                "Rounding errors prevent the line search"):
                    warnings.filterwarnings("ignore", message)
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
