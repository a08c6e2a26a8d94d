"""The heads stage: train each configured head on cached features, few-shot subsets included.

One :class:`HeadPlan` per entry of ``heads:`` in the experiment config. The
stage trains one estimator per (shot, seed) on the training features (a
stratified, seeded k-per-class subset, or all), picks its hyperparameter from a grid on
the validation split, and saves it under a content key: feature keys + head
config + shot + seed. Existing artifacts are reused, so adding a shot or a
head trains only what is new. Features are read from HDF5 once per process.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from storage import keys
from storage.faults import fault_point
from storage.features import FeatureRows, FeatureStore, FeatureStoreError
from storage.head_store import head_exists, load_head_arrays, read_meta, save_head
from storage.layout import CacheLayout
from storage.records import QualityFiles, read_json
from tasks.heads.configs import HeadConfig, Shot
from tasks.heads.plan import CLEANED, FitRecord, HeadPlan, HeadResult, fit_spec, fits, is_stored, probe_candidates  # noqa: F401
from tasks.machine import MEMORY_ENV, memory_budget

if TYPE_CHECKING:
    from tasks.heads.grid import GridHead


log = logging.getLogger("transferpipe.heads")

_load_lock = threading.Lock()


class SplitTooBig(ValueError):
    """A head that needs its training split in memory, on a split above the memory budget."""


def train_features(cache_dir: Path, key: str, layer: str) -> tuple[np.ndarray, np.ndarray] | FeatureRows:
    """The training split in memory (float32) when it fits the budget, else left on disk for chunked reading."""
    rows = FeatureStore(cache_dir).rows(key, layer)
    if rows.nbytes_float32 <= memory_budget():
        return load_split(cache_dir, key, layer)
    return rows


@functools.lru_cache(maxsize=16)
def _load(cache_dir: str, key: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    fs = FeatureStore(cache_dir).read(key, layers=[layer])
    return fs.features[layer].astype(np.float32), fs.labels


def load_split(cache_dir: Path, key: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and labels of one split, read from HDF5 once per process."""
    with _load_lock:  # heads running in threads wait for one read instead of each reading
        return _load(str(cache_dir), key, layer)


def few_shot_indices(labels: np.ndarray, shot: Shot, seed: int, excluded: np.ndarray | None = None) -> np.ndarray:
    """``shot`` examples per class (all of a smaller class), stratified and seeded; sorted. ``excluded`` (a row
    mask) rows are skipped in the same seeded order, so a cleaned subset differs only where a flagged row was
    drawn."""
    keep = np.ones(len(labels), dtype=bool) if excluded is None else ~excluded
    if shot == "all":
        return np.flatnonzero(keep)
    rng = np.random.default_rng(seed)
    picked = [order[keep[order]][:shot] for order in (rng.permutation(np.flatnonzero(labels == c))
                                                       for c in np.unique(labels))]
    return np.sort(np.concatenate(picked))


def _single_threaded_blas() -> None:
    """One BLAS thread per caller, for the whole process (idempotent).

    Heads train concurrently in threads; OpenBLAS called from several threads
    while using its own pool spins, so the concurrency comes from our threads.
    """
    global _BLAS_LIMITED
    if not _BLAS_LIMITED:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        _BLAS_LIMITED = True


_BLAS_LIMITED = False


def train_head(plan: HeadPlan) -> HeadResult:
    """Train (or reuse) every (shot, seed) fit of one head config."""
    _single_threaded_blas()
    started = time.perf_counter()
    h = plan.head
    todo = any(not head_exists(plan.cache_dir, key) for _, _, key in fits(plan))

    def split(key: str | None, read) -> Any:  # nothing is read when every fit is stored
        return read(plan.cache_dir, key, h.layer) if key and todo else (None, None)

    data = _Splits(split(plan.train_key, train_features), split(plan.val_key, load_split),
                   split(plan.target_key, load_split), excluded_rows(plan) if todo else None)
    records = [_reused(plan, key) if head_exists(plan.cache_dir, key) else _fit(plan, shot, seed, key, data)
               for shot, seed, key in fits(plan)]
    fitted = sum(r.fitted for r in records)
    return HeadResult(key=plan.key, name=plan.label, kind=h.kind, layer=h.layer, records=records, fits=fitted,
                      cache_hit=fitted == 0, seconds=time.perf_counter() - started)


class _Splits(NamedTuple):
    """(features, labels) of the train, val and target splits (None where there is none); a train split
    bigger than the memory budget is a FeatureRows."""

    train: tuple[np.ndarray, np.ndarray] | FeatureRows
    val: tuple[np.ndarray | None, np.ndarray | None]
    target: tuple[np.ndarray | None, np.ndarray | None]
    excluded: np.ndarray | None = None  # training rows left out (quality.exclude), a boolean mask


def excluded_rows(plan: HeadPlan) -> np.ndarray | None:
    """The training rows a cleaned head leaves out: its quality run's training label-issue candidates, as a
    mask in row order (None for a head that keeps every row)."""
    if plan.exclude is None:
        return None
    found = read_json(QualityFiles(CacheLayout(plan.cache_dir).quality(plan.exclude)).findings)
    if found is None:
        raise FileNotFoundError(f"head {plan.label!r} trains without the label issues of quality run "
                                f"{keys.short(plan.exclude)}, whose findings are not in {plan.cache_dir}: run "
                                "transferpipe quality CONFIG first")
    flagged = {f["id"] for f in found["label_issues"]["train"]["flagged"]}
    store = FeatureStore(plan.cache_dir)
    mask = np.array([p in flagged for p in store.paths(plan.train_key)], dtype=bool)
    return _keeping_every_class(mask, store.rows(plan.train_key, plan.head.layer), plan.label)


def _keeping_every_class(mask: np.ndarray, rows: Any, head: str) -> np.ndarray:
    """``mask`` less the rows of any class it would leave without a training image (before: the cleaned head, and
    then the whole run, failed at the evaluation); says how many it kept and why."""
    labels = rows.labels
    emptied = [c for c in np.unique(labels) if mask[labels == c].all()]
    if emptied:
        kept = np.isin(labels, emptied)
        log.info("head %s keeps %d flagged training image(s) of %s: every training image of %s is a label-issue "
                 "candidate, and leaving them out would leave no training image of the class", head,
                 int((mask & kept).sum()), ", ".join(repr(rows.classes[c]) if c < len(rows.classes) else str(c)
                                                     for c in emptied), "it" if len(emptied) == 1 else "each")
        mask = mask & ~kept
    return mask


def _reused(plan: HeadPlan, key: str) -> FitRecord:
    meta = read_meta(plan.cache_dir, key)
    return FitRecord(shot=meta["shot"], seed=meta["seed"], key=key, n_train=meta["n_train"], fitted=False,
                     val_accuracy=meta["val_accuracy"], best_param=meta["best_param"], grid=meta["grid"],
                     seconds=meta["fit_seconds"])


def _fit(plan: HeadPlan, shot: Shot, seed: int, key: str, data: _Splits) -> FitRecord:
    """One few-shot fit, saved as arrays + JSON under its key."""
    t0 = time.perf_counter()
    fault_point("heads.fit")
    (Xv, yv), (Xt, _) = data.val, data.target
    h = plan.head
    est = estimator(h).set_params(random_state=seed)
    if isinstance(data.train, FeatureRows):
        rows = data.train
        idx = few_shot_indices(rows.labels, shot, seed, data.excluded)
        if data.excluded is not None and data.excluded.any() and shot == "all":
            raise SplitTooBig(
                f"head {plan.label!r} leaves {int(data.excluded.sum())} flagged rows out of a train split of "
                f"{rows.rows:,} x {rows.dim}, above the heads' memory budget of {memory_budget() / 2**30:.1f} GiB "
                f"(${MEMORY_ENV}); streamed fits take every row: raise ${MEMORY_ENV}, or use few-shot subsets")
        if shot != "all":  # a few shots per class fit in memory whatever the split's size
            est.fit(rows.take(idx).astype(np.float32), rows.labels[idx], Xv, yv, X_target=Xt)
        elif est.streams:
            est.fit_rows(rows, Xv, yv)
        else:
            raise SplitTooBig(
                f"head {plan.label!r} (kind {h.kind}) needs its training features in memory, but the train split is "
                f"{rows.rows:,} x {rows.dim} = {rows.nbytes_float32 / 2**30:.1f} GiB as float32, above the heads' "
                f"memory budget of {memory_budget() / 2**30:.1f} GiB (${MEMORY_ENV}). For all labels use "
                f"kind: linear (L-BFGS over chunks) or kind: knn (chunked search), train {h.kind} on few-shot "
                f"subsets (shots: [1, 10, 100]), or raise ${MEMORY_ENV}"
            )
    else:
        X, y = data.train
        idx = few_shot_indices(y, shot, seed, data.excluded)
        est.fit(X[idx], y[idx], Xv, yv, X_target=Xt)
    if getattr(est, "converged_", True) is False:
        log.warning("head %r (shot %s, seed %s): L-BFGS stopped at max_iter=%s before converging; raise "
                    "max_iter in its config", plan.label, shot, seed, est.max_iter)
    record = FitRecord(shot=shot, seed=seed, key=key, n_train=len(idx), fitted=True,
                       val_accuracy=est.val_accuracy_, best_param=est.best_param_, grid=est.grid_,
                       seconds=time.perf_counter() - t0)
    meta = {
        "kind": h.kind, "name": plan.label, "params": est.get_params(), "classes": est.classes_.tolist(),
        "train_key": plan.train_key, "val_key": plan.val_key, "layer": h.layer, "shot": shot, "seed": seed,
        "n_train": record.n_train, "val_accuracy": record.val_accuracy, "best_param": record.best_param,
        "grid": record.grid, "fit_seconds": record.seconds, "spec": fit_spec(plan, shot, seed),
    }
    if data.excluded is not None:
        meta["excluded_rows"] = int(data.excluded.sum())
    if hasattr(est, "converged_"):
        meta["n_iter"], meta["converged"] = int(est.n_iter_[0]), est.converged_
    bank = getattr(est, "bank_rows_", None)
    if bank is not None:  # a kNN bank bigger than memory stays in its feature file
        meta["bank"] = {"key": bank.key, "layer": bank.layer}
    save_head(plan.cache_dir, record.key, est.to_arrays(), meta)
    return record


def best_probe(cache_dir: Path, candidates: list[str]) -> str | None:
    """The candidate fit with the best validation accuracy (the first of equals); None without candidates."""
    accuracy = {key: read_meta(cache_dir, key)["val_accuracy"] for key in candidates}
    return max(candidates, key=accuracy.__getitem__) if candidates else None


def estimator(head: HeadConfig) -> GridHead:
    """The unfitted estimator of a head config (scikit-learn or torch imported here, not with the config)."""
    from tasks.heads.estimators import HEADS

    return HEADS[head.kind](**head.estimator_params())


def load_head(cache_dir: Path, key: str) -> GridHead:
    """A saved head, ready to predict (checksum-verified; never unpickled)."""
    from tasks.heads.estimators import HEADS

    meta, arrays = load_head_arrays(cache_dir, key)
    extra = {"best_param": meta["best_param"], "val_accuracy": meta["val_accuracy"], "grid": meta["grid"]}
    head = HEADS[meta["kind"]].from_arrays(meta["params"], arrays, meta["classes"], extra)
    if meta.get("bank"):
        bank = meta["bank"]
        try:
            head.bank_rows_ = FeatureStore(cache_dir).rows(bank["key"], bank["layer"])
        except FeatureStoreError as exc:
            raise FeatureStoreError(
                f"kNN head {keys.short(key)} searches the train features {keys.short(bank['key'])}, which are not in "
                f"the cache ({exc}); run the experiment again: its extract stage recomputes them"
            ) from exc
    return head
