"""The predict stage: the new images' features (through the extraction stage), the model's probabilities,
temperature, conformal sets and OOD scores, written as one Parquet (or CSV) table.

Rows stream: the new images' features are read in blocks and written in row groups, so memory holds one
block whatever the number of images (only the training bank, for the OOD score, is read whole). Each block, once
scored, is kept as a part (``PredictionFiles.part``) until the table is published, so a killed run's next try
scores only the blocks it lacks; its features (the expensive part) are kept as pieces. The table is written
into a temporary folder and renamed into ``predictions/<key>/`` when complete (``StageFiles.staged``): a
killed run leaves nothing half-written.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from storage.faults import fault_point
from storage.features import FeatureStore
from storage.keys import short
from storage.records import PredictionFiles, ReportFiles
from storage.layout import CacheLayout
from tasks.evaluate.plan import EvalResult
from tasks.evaluate.report import recommended
from tasks.extract.stage import extract_split
from tasks.heads.stage import load_head
from tasks.predict import trust
from tasks.predict.plan import FINETUNED, PredictPlan, PredictResult, is_stored
from tasks.softmax import softmax

log = logging.getLogger("transferpipe.predict")
BLOCK_ROWS = 8192
FINETUNE_PREFIX = "finetune:"  # the model key of the fine-tuned model: its run's key follows


def predict(plan: PredictPlan) -> PredictResult:
    """Score the plan's images (or reuse the finished table) and return the figures and where the table is."""
    started = time.perf_counter()
    if is_stored(plan):
        saved = plan.files.read_result()
        return PredictResult.model_validate({**saved, "path": plan.files.table(plan.settings.format),
                                             "cache_hit": True, "seconds": 0.0})
    key, name = chosen_model(plan)
    if key.startswith(FINETUNE_PREFIX):  # every split through the fine-tuned checkpoint, scored by its classifier
        plan, head, meta_layer = through_finetuned(plan, key.removeprefix(FINETUNE_PREFIX))
    else:
        head, meta_layer = load_head(plan.cache_dir, key), _layer(plan.cache_dir, key)
    extracted = extract_split(plan.data)  # cached by pieces: only images never extracted go through the backbone
    store = FeatureStore(plan.cache_dir)
    classes = store.rows(plan.train, meta_layer).classes
    calibrated = _calibrate(plan, head, store, meta_layer)
    with plan.files.staged(sound=lambda: is_stored(plan)) as staged:
        counts = _write(plan, staged, head, store, meta_layer, classes, name, calibrated)
        bad = _bad_images(plan, store, staged)
        staged.report.write_text(trust_report(plan, name, calibrated), encoding="utf-8")
        scored = counts.pop("scored")
        result = PredictResult(key=plan.key, model=name, head=key, layer=meta_layer, bad_images=bad,
                               path=plan.files.table(plan.settings.format), cache_hit=False, seconds=0.0,
                               rows_scored=scored, **counts, **calibrated.figures())
        staged.write_spec(plan.spec)
        staged.write_result(result.model_dump_json(exclude={"path", "cache_hit", "seconds", "work_fields"}))
    shutil.rmtree(plan.files.parts, ignore_errors=True)  # published: the parts were for a retry
    _register(plan, result)
    log.info("predict: %d images scored with %s (features: %s)", counts["rows"], name,
             "cached" if extracted.cache_hit else f"{extracted.forward_batches} forward batches")
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def chosen_model(plan: Any) -> tuple[str, str]:
    """The fit key and name of the model: the named head's, or the evaluation's recommendation (the first artifact
    of the model chosen on val); the fine-tuned model's is ``finetune:<run key>``."""
    if plan.head is not None:
        return plan.head, plan.name
    files = ReportFiles(CacheLayout(plan.cache_dir).report(plan.experiment, plan.evaluation or ""))
    saved = files.read_result()
    if saved is None:
        raise ValueError(f"predict: the evaluation {short(plan.evaluation or '')} of {plan.experiment} is not in the "
                         "cache; run transferpipe run CONFIG first (or name a head with --model)")
    models = EvalResult.model_validate({**saved, "cache_hit": True, "seconds": 0.0}).models
    if plan.name == FINETUNED:
        pick = next((m for m in models if m.kind == "finetune" and m.artifacts), None)
        if pick is None:
            raise ValueError(f"predict: the evaluation of {plan.experiment} holds no fine-tuned model; set finetune: "
                             "{enabled: true} and run transferpipe run CONFIG")
    else:
        pick = recommended(models)
    if pick is not None and pick.kind == "finetune":
        return FINETUNE_PREFIX + pick.artifacts[0], FINETUNED
    if pick is None or not pick.artifacts:
        raise ValueError(f"predict: the evaluation of {plan.experiment} recommends no head (no validation split "
                         "scores); name one with --model")
    return pick.artifacts[0], pick.name if str(pick.shot) == "all" else f"{pick.name} shot {pick.shot}"


class FinetunedClassifier:
    """The fine-tuned model's own classifier over its penultimate features: class scores (logits), which
    :func:`probabilities` turns into probabilities with a softmax, as the model does. It has the attributes of a
    linear head on unscaled features, so export-model expresses it as one linear layer."""

    has_proba = False
    form = "linear"
    preprocess = "none"

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.coef_, self.intercept_ = np.asarray(weight, dtype=np.float64), np.asarray(bias, dtype=np.float64)
        self.mean_, self.scale_ = np.zeros(self.coef_.shape[1]), np.ones(self.coef_.shape[1])

    def class_scores(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_


def finetuned_model(cache_dir: Path, backbone: Any, splits: dict[str, Any], run: str
                    ) -> tuple[Any, dict[str, Any], FinetunedClassifier]:
    """The fine-tuning run's network: the backbone with its best checkpoint as weights (keyed by the file's
    sha256, like any weights file; the penultimate layer added when the config stores another), the splits
    extracted through it (cached in pieces like any backbone's), and its own classifier."""
    from storage.checkpoints import RunFiles
    from tasks.backbones.config import PENULTIMATE, file_digest
    from tasks.backbones.models import source_classifier
    from tasks.extract.plan import with_backbone

    best = RunFiles(CacheLayout(cache_dir).finetune_run(run)).best
    if not best.is_file():
        raise ValueError(f"the fine-tuning run {short(run)} has no best.pt ({best}); run transferpipe run CONFIG "
                         "to fine-tune again")
    layers = backbone.layers if PENULTIMATE in backbone.layers else (*backbone.layers, PENULTIMATE)
    backbone = dataclasses.replace(backbone, weights=str(best), weights_id="sha256:" + file_digest(best, cache_dir),
                                   layers=layers)
    found = source_classifier(backbone)
    if isinstance(found, str):
        raise ValueError(f"the fine-tuned checkpoint {best} has no classifier ({found})")
    through = {name: with_backbone(p, backbone) for name, p in splits.items()}
    for split in through.values():
        extract_split(split)
    return backbone, through, FinetunedClassifier(*found)


def through_finetuned(plan: PredictPlan, run: str) -> tuple[PredictPlan, FinetunedClassifier, str]:
    """The plan with every split (the new images, the OOD set, train, val and test) extracted through the
    fine-tuned network, its classifier, and the layer it reads (the penultimate one)."""
    from tasks.backbones.config import PENULTIMATE
    from tasks.extract.plan import with_backbone

    backbone, splits, head = finetuned_model(plan.cache_dir, plan.data.backbone, plan.splits, run)
    update = {"data": with_backbone(plan.data, backbone), "splits": splits, "train": splits["train"].key,
              "val": splits["val"].key, "test": splits["test"].key if "test" in splits else None,
              "ood": with_backbone(plan.ood, backbone) if plan.ood is not None else None}
    return plan.model_copy(update=update), head, PENULTIMATE


def model_and_shots(name: str) -> tuple[str, str]:
    """A model name as :func:`chosen_model` gives it (``<model>``, or ``<model> shot <k>`` for a few-shot fit)
    split into the report's model name and its label count (``all``)."""
    model, _, shots = name.partition(" shot ")
    return model, shots or "all"


def _layer(cache_dir: Path, key: str) -> str:
    from storage.head_store import read_meta

    return read_meta(cache_dir, key)["layer"]


def probabilities(head: Any, X: np.ndarray) -> np.ndarray:
    """The head's class probabilities (a softmax of its class scores for heads without them: ridge, SVM)."""
    return head.predict_proba(X) if head.has_proba else softmax(head.class_scores(X))


class Calibrated:
    """The temperature, the conformal threshold and the OOD detector, fitted on val (and train for the bank)."""

    def __init__(self, temperature: float, threshold: float, bank: np.ndarray, ood_threshold: float,
                 calibration: dict[str, float], test: dict[str, Any]) -> None:
        self.temperature, self.threshold, self.bank, self.ood_threshold = temperature, threshold, bank, ood_threshold
        self.calibration, self.test = calibration, test

    def figures(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "threshold": self.threshold, "ood_threshold": self.ood_threshold,
                "calibration": self.calibration, "test": self.test}


def fit_trust(cache_dir: Path, head: Any, layer: str, val: str, train: str, settings: Any) -> Calibrated:
    """The temperature and conformal threshold (on val) and the OOD bank (train) and threshold (val) of a
    head: what predict applies and what export-model puts inside the artifact."""
    store = FeatureStore(cache_dir)
    found = store.read(val, [layer])
    probs, labels = probabilities(head, found.features[layer].astype(np.float32)), found.labels.astype(np.int64)
    temperature = trust.fit_temperature(probs, labels)
    calibrated = trust.scaled(probs, temperature)
    q = trust.threshold(calibrated, labels, settings.coverage, settings.method, settings.penalty())
    bank = trust.unit_rows(store.read(train, [layer]).features[layer])
    val_ood = trust.ood_scores(trust.unit_rows(found.features[layer]), bank)
    ood_threshold = float(np.quantile(val_ood, settings.ood_pass, method="higher"))
    figures = {"val_rows": float(len(labels)), "nll_before": trust.nll(probs, labels),
               "nll_after": trust.nll(calibrated, labels), "ece_before": trust.ece(probs, labels),
               "ece_after": trust.ece(calibrated, labels)}
    return Calibrated(temperature, q, bank, ood_threshold, figures, {})


def _calibrate(plan: PredictPlan, head: Any, store: FeatureStore, layer: str) -> Calibrated:
    fitted = fit_trust(plan.cache_dir, head, layer, plan.val, plan.train, plan.settings)
    temperature, q, bank = fitted.temperature, fitted.threshold, fitted.bank
    found = store.read(plan.test, [layer]) if plan.test else None  # read once: sets and OOD both score it
    test = _test_figures(plan, head, found, layer, temperature, q) if found is not None else {}
    if plan.ood is not None and found is not None:  # how well the OOD score separates test from a known OOD set
        extract_split(plan.ood)
        inside = trust.ood_scores(trust.unit_rows(found.features[layer]), bank)
        outside = trust.ood_scores(trust.unit_rows(store.read(plan.ood.key, [layer]).features[layer]), bank)
        test["ood"] = trust.ood_figures(inside, outside)
    fitted.test = test
    return fitted


def _test_figures(plan: PredictPlan, head: Any, test: Any, layer: str, temperature: float, q: float
                  ) -> dict[str, Any]:
    """Coverage of the sets on the (labelled) test split: marginal, per class, by the rank of the true class."""
    probs = trust.scaled(probabilities(head, test.features[layer].astype(np.float32)), temperature)
    labels = test.labels.astype(np.int64)
    mask = trust.sets(probs, q, plan.settings.method, plan.settings.penalty())
    covered = mask[np.arange(len(labels)), labels]
    rank = (probs > probs[np.arange(len(labels)), labels][:, None]).sum(axis=1)  # 0: the true class is top-1
    by_rank = {("1" if r == 0 else "2" if r == 1 else "3+"): float(covered[sel].mean())
               for r, sel in ((0, rank == 0), (1, rank == 1), (2, rank >= 2)) if sel.any()}
    per_class = {test.classes[c]: float(covered[labels == c].mean()) for c in np.unique(labels)}
    return {"rows": int(len(labels)), "coverage": float(covered.mean()), "mean_set_size": float(mask.sum(1).mean()),
            "coverage_by_class": per_class, "coverage_by_rank": by_rank, "top1": float((probs.argmax(1) == labels).mean())}


def _blocks(plan: PredictPlan, store: FeatureStore, layer: str) -> Iterator[tuple[list[str], np.ndarray]]:
    rows = store.rows(plan.data.key, layer)
    ids = store.paths(plan.data.key)
    for start, block in rows.chunks(BLOCK_ROWS):
        yield ids[start:start + len(block)], np.asarray(block, dtype=np.float32)


def _write(plan: PredictPlan, out: PredictionFiles, head: Any, store: FeatureStore, layer: str, classes: list[str],
           name: str, fit: Calibrated) -> dict[str, int]:
    """The table, block by block: id, path, top-k labels and probabilities, the set, the OOD score and flag."""
    s, names = plan.settings, np.asarray(classes, dtype=object)
    where = _locations(plan)
    counts = {"rows": 0, "single": 0, "empty": 0, "ood": 0, "scored": 0}
    with _Table(out.table(s.format), s.format) as table:
        for block, (ids, X) in enumerate(_blocks(plan, store, layer)):
            columns = _read_part(plan.files.part(block), ids)
            if columns is None:
                probs = trust.scaled(probabilities(head, X), fit.temperature)
                k = min(s.top_k, probs.shape[1])
                top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                mask = trust.sets(probs, fit.threshold, s.method, s.penalty())
                ood = trust.ood_scores(trust.unit_rows(X), fit.bank)
                columns = {
                    "id": ids, "path": where(ids),
                    "label": [str(names[t[0]]) for t in top],
                    "probability": [float(probs[r, t[0]]) for r, t in enumerate(top)],
                    "top_labels": [[str(names[c]) for c in t] for t in top],
                    "top_probabilities": [[float(probs[r, c]) for c in t] for r, t in enumerate(top)],
                    "prediction_set": [[str(names[c]) for c in np.flatnonzero(m)] for m in mask],
                    "set_size": mask.sum(axis=1).astype(np.int64).tolist(), "ood_score": ood.tolist(),
                    "ood": (ood > fit.ood_threshold).tolist(), "model": [name] * len(ids),
                }
                _write_part(plan.files.part(block), columns)
                counts["scored"] += len(ids)
                fault_point("predict.block")
            table.write(columns)
            sizes = np.asarray(columns["set_size"])
            counts["rows"] += len(ids)
            counts["single"] += int((sizes == 1).sum())
            counts["empty"] += int((sizes == 0).sum())
            counts["ood"] += int(np.sum(columns["ood"]))
    return counts


def _read_part(path: Path, ids: list[str]) -> dict[str, list[Any]] | None:
    """A block a killed try scored, if it is there, readable and of these rows (else None: score it again)."""
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        columns = pq.read_table(path).to_pydict()
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        log.warning("predict: %s is unreadable (%s); scoring its block again", path, exc)
        return None
    return columns if columns.get("id") == list(ids) else None


def _write_part(path: Path, columns: dict[str, list[Any]]) -> None:
    """One scored block, written whole or not at all (a temporary file renamed into place)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def _locations(plan: PredictPlan) -> Callable[[list[str]], list[str]]:
    """Ids to where the images are (a file, a shard's member, a table's row or its Hugging Face ``path``)."""
    from tasks.data.config import get
    from tasks.data.manifest import Manifest

    manifest = Manifest.load(plan.data.manifest)
    source = get(manifest.source)
    return lambda ids: source.locations(Path(manifest.root), ids, manifest.options)


def trust_report(plan: PredictPlan, name: str, fit: Calibrated) -> str:
    """``report.md``: how far to trust the predictions, from val (calibration) and test (coverage, the OOD score)."""
    cal, test, s = fit.calibration, fit.test, plan.settings
    lines = [f"# Predictions of {name} ({plan.experiment}): how far to trust them", "",
             f"Calibrated on {int(cal['val_rows'])} val images: temperature {fit.temperature:.3f}; NLL "
             f"{cal['nll_before']:.4f} -> {cal['nll_after']:.4f}, ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}.",
             f"Prediction sets: split conformal ({s.method}), target coverage {s.coverage:g} (threshold "
             f"{fit.threshold:.6g}). Out of distribution: the kNN distance to train above {fit.ood_threshold:.6g} "
             f"({s.ood_pass:.0%} of val pass).", ""]
    if test:
        lines += [f"## On the test split ({test['rows']} images)", "",
                  f"Coverage {test['coverage']:.3f}, mean set size {test['mean_set_size']:.2f}, top-1 {test['top1']:.3f}.",
                  "", "| rank of the true class | coverage |", "|---|---|",
                  *(f"| {r} | {c:.3f} |" for r, c in test["coverage_by_rank"].items()), "",
                  "| class | coverage |", "|---|---|", *(f"| {k} | {c:.3f} |" for k, c in test["coverage_by_class"].items())]
        if test.get("ood"):
            o = test["ood"]
            lines += ["", f"OOD score on {int(o['ood_rows'])} known out-of-distribution images against the test split: "
                      f"AUROC {o['auroc']:.3f}, FPR95 {o['fpr95']:.3f}."]
    else:
        lines += ["No labelled test split: coverage was not measured."]
    return "\n".join(lines) + "\n"


def _register(plan: PredictPlan, result: PredictResult) -> None:
    """The test split's trust figures on the served model's row of the results registry."""
    from storage import results as registry

    test, ood = result.test, result.test.get("ood", {})
    figures = {"predict_key": plan.key, "coverage_target": plan.settings.coverage, "coverage": test.get("coverage"),
               "mean_set_size": test.get("mean_set_size"), "ood_auroc": ood.get("auroc"), "ood_fpr95": ood.get("fpr95")}
    name, shots = model_and_shots(result.model)
    if plan.evaluation and test and not registry.add_trust(plan.cache_dir, plan.evaluation, name, figures, shots):
        log.info("predict: the results registry has no row of %s in evaluation %s: its trust figures stay in %s",
                 name, short(plan.evaluation), plan.files.folder)


def _bad_images(plan: PredictPlan, store: FeatureStore, out: PredictionFiles) -> int:
    """The images the extraction left out (``on_bad_image: skip``), listed beside the table."""
    skipped = store.read(plan.data.key, []).skipped
    if skipped:
        with open(out.bad_images, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "error"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(skipped)
    return len(skipped)


class _Table:
    """A Parquet file written one row group per block (pyarrow), or a CSV with the lists joined by ``|``."""

    def __init__(self, path: Path, format: str) -> None:
        self.path, self.format, self.writer, self.fh = path, format, None, None

    def __enter__(self) -> _Table:
        return self

    def write(self, columns: dict[str, list[Any]]) -> None:
        if self.format == "csv":
            if self.fh is None:
                self.fh = open(self.path, "w", newline="", encoding="utf-8")
                self.writer = csv.writer(self.fh)
                self.writer.writerow(list(columns))
            lists = {n for n, v in columns.items() if v and isinstance(v[0], list)}
            for row in zip(*columns.values()):
                self.writer.writerow(["|".join(map(str, v)) if n in lists else v for n, v in zip(columns, row)])
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        batch = pa.table(columns)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, batch.schema)
        self.writer.write_table(batch)

    def __exit__(self, *exc: Any) -> None:
        if self.format == "csv":
            if self.fh is None:
                self.fh = open(self.path, "w", encoding="utf-8")
            self.fh.close()
        elif self.writer is not None:
            self.writer.close()
