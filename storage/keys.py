"""Content fingerprints: the one place where every cache key is computed.

A key is the sha256 of the canonical JSON of a *spec*: everything that changes
what a stage produces, including the code version of that stage. Each
``*_spec`` function below builds one stage's spec; :func:`key` hashes it.
Prefect's cache keys are derived from these, never from hashing arrays or file
handles (docs/ARCHITECTURE.md, "Keys").
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Bump a stage's version when a change alters what it computes from the same inputs
#: (or, for features, the file layout): its old results then get new keys and are recomputed.
CODE_VERSIONS = {"features": 1, "heads": 5, "finetune": 3, "evaluate": 6, "scores": 1, "export": 2, "index": 1,
                 "quality": 2, "predict": 2, "model": 1,
                 # what a backbone source says of a model (names, modules, preprocessing, channels-last layers)
                 "backbones": 1, "manifest": 1}
FEATURE_FORMAT_VERSION = CODE_VERSIONS["features"]


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8: equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_identities(root: str | Path, entries: Iterable[tuple[str, int]], content: bool = False) -> list[Any]:
    """Per file: ``[size, mtime_ns]`` (cheap, catches edits) or, with ``content``, the sha256 of its bytes."""
    base = os.fspath(root)
    identify = file_sha256 if content else _stat_identity
    # string joins, not Path objects: a million stats take seconds, not tens of them
    return [_or_unreadable(identify, os.path.join(base, rel)) for rel, _ in entries]


def _stat_identity(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _or_unreadable(identify, path: str) -> Any:
    """A file that cannot be read (a link loop, no permission) still gets an identity: decoding names it later."""
    try:
        return identify(path)
    except OSError as exc:
        return ["unreadable", exc.errno]


def manifest_fingerprint(
    entries: Iterable[tuple[str, int]], identities: list[Any], classes: list[str], content: bool = False,
    options: dict[str, str] | None = None,
) -> str:
    """Fingerprint ``(relative path, label)`` pairs and their files' identities (:func:`file_identities`), and
    the source options that say which bytes an item is (a table's image column), when there are any."""
    rows = [[rel, int(label), ident] for (rel, label), ident in zip(entries, identities)]
    rows.sort(key=lambda row: row[0])  # ids are unique: the order of a full sort, at a fraction of its cost
    what = {"classes": list(classes), "files": rows, "mode": "content" if content else "stat"}
    return fingerprint({**what, "options": options} if options else what)


def dataset_id(fingerprints: dict[str, str]) -> str:
    """A dataset's identity (its manifest's name): the fingerprints of its splits."""
    return fingerprint({"kind": "dataset", "version": CODE_VERSIONS["manifest"], "splits": fingerprints})


def backbone_memo_key(what: dict[str, Any]) -> str:
    """What a backbone source answered about ``what`` (which names the source's library version or the
    factory file's identity); bump ``CODE_VERSIONS["backbones"]`` when a source's answers change."""
    return fingerprint({"kind": "backbone-memo", "version": CODE_VERSIONS["backbones"], **what})


def piece_key(spec: dict[str, Any], ids: list[str], identities: list[Any], source: str,
              options: dict[str, str] | None = None) -> str:
    """One piece of a split's features: the feature spec without the dataset and split (a piece belongs to
    any split that holds the same items), the source and its options (which bytes an item is), and the
    piece's item ids and identities in row order."""
    return fingerprint({"kind": "piece", "spec": piece_spec(spec), "source": source, "options": options or {},
                        "items": ids, "files": identities})


def tail_key(spec: dict[str, Any], first_id: str, identity: Any, source: str, options: dict[str, str] | None = None
             ) -> str:
    """Where a split's last piece is remembered (``FeatureStore.remember_tail``): the feature spec without dataset
    and split, the source and its options, and the piece's first item. A later piece that starts with the same
    item finds it and, when its first items give the remembered piece's key again, copies those rows."""
    return fingerprint({"kind": "tail", "spec": piece_spec(spec), "source": source, "options": options or {},
                        "first": first_id, "identity": identity})


def piece_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """What a piece file holds of a split's feature spec (stored in its attrs): all but dataset and split."""
    return {k: v for k, v in spec.items() if k not in ("dataset", "split")}


def feature_spec(
    *,
    backbone: str,
    weights: str,
    layers: list[str],
    pooling: str,
    preprocess: dict[str, Any],
    dataset: str,
    split: str,
    dtype: str,
    precision: str,
    source: dict[str, Any] | None = None,
    channels_last: list[str] | None = None,
) -> dict[str, Any]:
    """Everything that determines the bytes of one feature file (stored in its attrs).

    ``source``: where a non-torchvision backbone comes from (timm, or a python
    factory's kwargs and code hash); absent for torchvision so its keys stay as in v0.1.
    ``channels_last``: layers whose (B, H, W, C) outputs are pooled over space (Swin's stages).
    ``precision``: what the forward pass computed in (fp32, or bf16/fp16 autocast on CUDA), so
    features from different precisions never share a file and a resume never mixes them.
    """
    return {
        **({"source": source} if source is not None else {}),
        **({"channels_last": list(channels_last)} if channels_last else {}),
        "backbone": backbone,
        "weights": weights,
        "layers": list(layers),
        "pooling": pooling,
        "preprocess": dict(preprocess),
        "dataset": dataset,
        "split": split,
        "dtype": dtype,
        "precision": precision,
        "format_version": FEATURE_FORMAT_VERSION,
    }


def feature_key(spec: dict[str, Any]) -> str:
    return fingerprint({"kind": "features", **spec})


def key(spec: dict[str, Any]) -> str:
    """The key of any spec built below (feature specs: :func:`feature_key`)."""
    return fingerprint(spec)


def head_spec(head: dict[str, Any], train: str, val: str | None, target: str | None,
              exclude: str | None = None) -> dict[str, Any]:
    """One head config (every shot and seed) on one set of feature keys; ``exclude``: the quality key whose
    training label-issue candidates it leaves out (only in the spec when set, so other keys stay as they were)."""
    return {"kind": "heads", "version": CODE_VERSIONS["heads"], "head": head, "train": train, "val": val,
            "target": target, **({"exclude": exclude} if exclude else {})}


def fit_spec(
    head: dict[str, Any], train: str, val: str | None, target: str | None, shot: int | str, seed: int,
    exclude: str | None = None,
) -> dict[str, Any]:
    """One fitted head: ``head`` without the fields that only label it or list its fits (name, shots, seeds)."""
    return {"kind": "head", "version": CODE_VERSIONS["heads"], "head": head, "train": train, "val": val,
            "target": target, "shot": shot, "seed": seed, **({"exclude": exclude} if exclude else {})}


def finetune_spec(
    backbone: dict[str, Any], features: dict[str, str], finetune: dict[str, Any], probe: str | None, precision: str
) -> dict[str, Any]:
    """A fine-tuning run: backbone identity, the splits' feature keys, its settings, the LP-FT probe, and the
    precision its forward and backward passes run in (a checkpoint is never resumed in another one)."""
    return {"kind": "finetune", "version": CODE_VERSIONS["finetune"], "backbone": backbone, "features": features,
            "finetune": finetune, "probe": probe, "precision": precision}


def evaluation_spec(experiment: str, test: str, models: list[dict[str, Any]],
                    extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """An experiment's evaluation: the test features, the identity of every model scored on them, and what else
    the report computes from features (``retrieval``, ``embedding_map``: their settings and feature keys)."""
    return {"kind": "evaluate", "version": CODE_VERSIONS["evaluate"], "experiment": experiment, "test": test,
            "models": models, **(extras or {})}


def retrieval_spec(queries: str, gallery: str | None, settings: dict[str, Any], index: Any) -> dict[str, Any]:
    """Retrieval metrics of one query split against one gallery (None: leave-one-out), remembered across
    evaluations (``index``: the FAISS index searched instead of the exact search)."""
    return {"kind": "retrieval", "version": CODE_VERSIONS["evaluate"], "queries": queries, "gallery": gallery,
            "settings": settings, "index": index}


def metrics_spec(test: str, fit: str) -> dict[str, Any]:
    """One fitted head's metrics on one split's features (cached so a rerun scores only what changed)."""
    return {"kind": "metrics", "version": CODE_VERSIONS["evaluate"], "test": test, "fit": fit}


def scores_spec(features: str, layer: str, classifier: str) -> dict[str, Any]:
    """Transferability scores of one candidate's training features (``classifier``: its weights identity)."""
    return {"kind": "scores", "version": CODE_VERSIONS["scores"], "features": features, "layer": layer,
            "classifier": classifier}


def export_spec(features: str, layer: str, format: str, dtype: str, row_group_rows: int) -> dict[str, Any]:
    """One split's features written out as Parquet or NumPy (tasks/export/stage.py)."""
    return {"kind": "export", "version": CODE_VERSIONS["export"], "features": features, "layer": layer,
            "format": format, "dtype": dtype, "row_group_rows": row_group_rows}


def index_spec(features: str, queries: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """A FAISS index over one split's features (tasks/index/), with the split its recall queries come from."""
    return {"kind": "index", "version": CODE_VERSIONS["index"], "features": features, "queries": queries, **settings}


def quality_spec(features: dict[str, str], settings: dict[str, Any]) -> dict[str, Any]:
    """The data-quality findings of one dataset's features (tasks/quality/): every split's feature key."""
    return {"kind": "quality", "version": CODE_VERSIONS["quality"], "features": features, "settings": settings}


# ---------------------------------------------------------------- keys of bookkeeping, not of stored results
# (their formulas are fixed: changing one makes existing caches' records, memos or pieces miss once)


def predict_spec(model: dict[str, Any], data: str, calibration: str, train: str, settings: dict[str, Any]
                 ) -> dict[str, Any]:
    """Predictions on new images (tasks/predict/): the model (a head's fit key, or the evaluation whose
    recommendation it is), the new images' feature key, the features the temperature, the conformal threshold
    (calibration: val) and the OOD detector (train) are fitted on, and the settings."""
    return {"kind": "predict", "version": CODE_VERSIONS["predict"], "model": model, "data": data,
            "calibration": calibration, "train": train, "settings": settings}


def model_export_spec(model: dict[str, Any], backbone: str, calibration: str, train: str, test: str,
                      settings: dict[str, Any]) -> dict[str, Any]:
    """A model exported for other runtimes (tasks/model_export/): the head (or the evaluation that recommends
    it), the backbone's weights, the features its trust is fitted on and its parity is checked on, the settings."""
    return {"kind": "model", "version": CODE_VERSIONS["model"], "model": model, "backbone": backbone,
            "calibration": calibration, "train": train, "test": test, "settings": settings}


def cache_id(cache_dir: str | Path) -> str:
    """A cache folder's identity (16 hex digits of its resolved path): in Prefect cache keys and block names."""
    return fingerprint(str(Path(cache_dir).resolve()))[:16]


def prefect_cache_key(task_name: str, key: str, cache_dir: str | Path) -> str:
    """A stage task's Prefect cache key: task name (tasks with equal inputs never share a record), the stage's
    own key, and the cache folder (two caches side by side each get their own record)."""
    return f"{task_name}-{key}-{cache_id(cache_dir)}"


def records_block_name(folder: str) -> str:
    """The Prefect storage block of one cache's stage records (``folder``: the resolved cache path)."""
    return f"transferpipe-records-{fingerprint(folder)[:16]}"


def shard_scan_key(path: str, size: int, mtime_ns: int, label: list[str]) -> str:
    """What a scan of one WebDataset shard found, by the shard's path, size and mtime and the label it reads."""
    return fingerprint({"kind": "shard-scan", "version": 3, "path": path, "size": size, "mtime_ns": mtime_ns,
                        "label": label})


def piece_group_key(split: str, pieces: list[str]) -> str:
    """A group of pieces one scale-out worker extracts: the split's key and the pieces' keys."""
    return fingerprint({"kind": "piece-group", "split": split, "pieces": pieces})


def dataset_resource(experiment: str, data: dict[str, Any], cache_dir: str | Path) -> str:
    """The Prefect event resource of an experiment's data (``transferpipe watch``): its name and a fingerprint
    of its ``data:`` section and cache folder, so two configs sharing a name never trigger each other."""
    ident = {"data": data, "cache_dir": str(Path(cache_dir).expanduser().resolve())}
    return f"transferpipe.dataset.{experiment}.{fingerprint(ident)[:12]}"


def short(key: str) -> str:
    """The first 12 hex digits: enough to name a key in tables and logs."""
    return key[:12]


def spec_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """What differs between two specs, one ``dotted.path old → new`` line per changed leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new))
                for line in spec_diff(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    if old == new:
        return []
    return [f"{path or 'spec'} {_short_value(old)} → {_short_value(new)}"]


def closest(new: dict[str, Any], stored: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]] | None:
    """The stored spec of the same kind that differs least from ``new``, and the differences; None if none."""
    same = [old for old in stored if old.get("kind", "features") == new.get("kind", "features")]
    if not same:
        return None
    return min(((old, spec_diff(old, new)) for old in same), key=lambda pair: len(pair[1]))


def _short_value(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return short(value)  # another stage's key
    text = "absent" if value is None else canonical_json(value)
    return text if len(text) <= 40 else text[:37] + "..."
