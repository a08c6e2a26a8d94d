"""The evaluation plan: the ``evaluate:`` config, the models to evaluate (heads and fine-tuned runs), the
plan's key, and the report's rows (:class:`ModelReport`). The stage and the report import it, never back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import ReportFiles
from tasks.backbones.config import BackboneSpec, resolve
from tasks.data.manifest import Manifest
from tasks.declare import Graph, Section, Stage, Work, against, check_layer, features, held_out
from tasks.evaluate.projection import MapConfig
from tasks.index.retrieval import RetrievalConfig
from tasks.finetune import plan as finetune
from tasks.heads.plan import fits
from tasks.result import StagePlan, StageResult, summarize


class EvaluateConfig(BaseModel):
    """``evaluate:`` section: what the report computes besides the models' scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retrieval: RetrievalConfig | None = Field(None, description="Recall@k, precision@k and mAP@R of test queries")
    embedding_map: MapConfig = MapConfig()


class ModelToEvaluate(BaseModel):
    """A trained head (by artifact key) or the fine-tuned checkpoint."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    layer: str = "penultimate"
    shot: int | str = "all"
    seed: int = 0
    head_key: str | None = None
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    tried: list[str] = Field(default_factory=list, description="the fine-tuning search's run keys (in the key: the "
                                                               "report lists them)")


class EvalPlan(StagePlan):
    """Every model to score on the test split, and what the experiment's report says besides the scores."""

    experiment: str
    test_key: str
    manifest: Path
    cache_dir: Path
    backbone: BackboneSpec
    classes: list[str]
    models: list[ModelToEvaluate]
    device: str = "auto"
    retrieval: dict[str, Any] | None = Field(None, description="settings, queries' and gallery's feature keys, "
                                                                 "the FAISS index's settings (or None)")
    embedding_map: dict[str, Any] | None = Field(None, description="settings and the feature key of each split")
    quality: str | None = Field(None, description="the quality findings' key: their leaked test images are left out "
                                                  "of top1_without_leaks")
    context: dict[str, Any] = Field(default_factory=dict, description="report context (config, stage timings, keys); "
                                                                      "not in the key")

    @property
    def files(self) -> ReportFiles:
        return ReportFiles(CacheLayout(self.cache_dir).report(self.experiment, self.key))


class ModelReport(BaseModel):
    name: str
    kind: str
    layer: str
    shot: int | str
    seeds: int
    metrics: dict[str, Any]
    train_seconds: float = 0.0  # summed over seeds
    val_accuracy: float | None = None  # on the validation split, mean over seeds: what a recommendation may use
    artifacts: list[str] = Field(default_factory=list, description="head keys of its fits (best on val first), or "
                                                                   "the fine-tuning run's key")


class EvalResult(StageResult):
    key: str
    models: list[ModelReport]  # best first (test top-1)
    report: Path
    retrieval: dict[str, Any] | None = None


def plan_evaluation(experiment: str, test_key: str, manifest: Path, cache_dir: Path, backbone: BackboneSpec,
                    classes: list[str], models: list[ModelToEvaluate], device: str = "auto",
                    context: dict[str, Any] | None = None, retrieval: dict[str, Any] | None = None,
                    embedding_map: dict[str, Any] | None = None, quality: str | None = None) -> EvalPlan:
    """``quality``: the key of the experiment's quality findings: its leaked test images are left out of a second
    top-1 (``top1_without_leaks``)."""
    extras = {name: value for name, value in (("retrieval", retrieval), ("embedding_map", embedding_map),
                                              ("quality", quality)) if value}
    spec = keys.evaluation_spec(experiment, test_key, [
        m.model_dump(mode="json", exclude={"checkpoint", "train_seconds"}) | {"ckpt": _ckpt_id(m)} for m in models],
        extras)
    return EvalPlan(key=keys.key(spec), spec=spec, experiment=experiment, test_key=test_key, manifest=manifest,
                    cache_dir=cache_dir, backbone=backbone, classes=classes, models=models, device=device,
                    context=context or {}, retrieval=retrieval, embedding_map=embedding_map, quality=quality)


def _ckpt_id(m: ModelToEvaluate) -> str | None:
    return m.checkpoint.parent.name if m.checkpoint else None  # finetune/<key>/best.pt: the key says it all


def is_stored(plan: EvalPlan) -> bool:
    return plan.files.read_result() is not None


def _probe_kept(best: Any) -> dict[str, float] | None:
    """When no epoch of the chosen fine-tuning run (its result) beat the probe it started from on validation: the
    numbers the report gives for it (None when fine-tuning won)."""
    if best.best_epoch != 0:
        return None
    later = [h.val_accuracy for h in best.history if h.epoch > 0]
    return {"probe_val_accuracy": best.best_val_accuracy, "best_tuned_val_accuracy": max(later) if later else None}


def chosen_finetune(graph: Graph) -> tuple[int, list[dict[str, Any]]]:
    """Which fine-tuning run is the experiment's fine-tuned model (best on validation; tasks.finetune.plan.chosen),
    and what the search tried (for the report; empty without a search)."""
    works, tuned = graph["finetune"].works, graph["finetune"].results
    index = finetune.pick(tuned) if tuned else finetune.chosen([w.plan for w in works])
    tried = [] if len(works) == 1 else [
        {"settings": w.what, "key": w.plan.key, "chosen": i == index,
         **({"best_epoch": r.best_epoch, "best_val_accuracy": r.best_val_accuracy, "train_seconds": r.train_seconds}
            if r is not None else {})}
        for i, (w, r) in enumerate(zip(works, tuned or [None] * len(works)))]
    return index, tried


def test_split(graph: Graph) -> Any:
    found = features(graph).get("test")
    if found is None:
        raise ValueError("the pipeline evaluates on a test split: set data.test_fraction > 0 or add a test folder")
    return found


def _models(graph: Graph) -> tuple[list[ModelToEvaluate], Any, list[dict[str, Any]], dict[str, float] | None]:
    """Every model to evaluate (each head fit, the chosen fine-tuned run), that run's work, the search's runs
    and the probe it kept (if it did)."""
    heads = graph["heads"] if "heads" in graph else None
    seconds = {rec.key: rec.seconds for r in (heads.results or []) for rec in r.records} if heads else {}
    models = [ModelToEvaluate(name=p.label, kind=p.head.kind, layer=p.head.layer, shot=shot, seed=seed,
                              head_key=key, train_seconds=seconds.get(key, 0.0))
              for p in (heads.plans() if heads else []) for shot, seed, key in fits(p)]
    tuning, tried, kept = None, [], None
    if "finetune" in graph:
        index, tried = chosen_finetune(graph)
        tuning, tuned = graph["finetune"].works[index], graph["finetune"].results
        kept = _probe_kept(tuned[index]) if tuned else None
        models.append(ModelToEvaluate(name="finetuned", kind="finetune", checkpoint=finetune.run_files(tuning.plan).best,
                                      train_seconds=sum(r.train_seconds for r in tuned) if tuned else 0.0,
                                      tried=[t["key"] for t in tried]))
    return models, tuning, tried, kept


def _plan(config: Any, graph: Graph) -> list[Work]:
    split, test = features(graph), test_split(graph)
    models, tuning, tried, kept = _models(graph)
    if not models:
        raise ValueError(f"experiment {config.name!r} has nothing to evaluate: add heads or enable finetune")
    quality = graph["quality"].works[0].plan.key if "quality" in graph else None
    context = {
        "config": config.model_dump(mode="json"),
        "stages": {name: summarize(s.results) for name, s in graph.items() if s.results},
        "keys": {"features": {s: f.key for s, f in split.items()},
                 "heads": {m.name if m.shot == "all" else f"{m.name} shot {m.shot} seed {m.seed}": m.head_key
                           for m in models if m.head_key},
                 "finetune": tuning.plan.key if tuning else None, "quality": quality},
        "finetune_search": tried,
        "finetune_probe": kept,
    }
    plan = plan_evaluation(
        config.name, test.key, test.manifest, config.cache_dir, resolve(config.backbone, config.cache_dir),
        Manifest.load(test.manifest).classes, models, device=config.extract.device, context=context,
        quality=quality, **feature_reports(config, split),
    )
    return [Work(config.name, plan, is_stored(plan))]


def feature_reports(config: Any, split: dict[str, Any]) -> dict[str, Any]:
    """What the evaluation computes from features besides the models: retrieval (evaluate.retrieval) and the
    embedding map (evaluate.embedding_map), each as its settings and the feature keys it reads."""
    wanted, out = config.evaluate, {}
    if wanted.retrieval is not None:
        check_layer(config, "evaluate.retrieval.layer", wanted.retrieval.layer)
    check_layer(config, "evaluate.embedding_map.layer", wanted.embedding_map.layer)
    if wanted.retrieval is not None:
        r = wanted.retrieval
        gallery = split["train"].key if r.gallery == "train" else None
        index = None
        if r.index == "faiss":
            from tasks.index.plan import IndexConfig, require_faiss

            if gallery is None or r.metric == "standardized":
                raise ValueError("evaluate.retrieval.index: faiss searches the train split's index by cosine or l2 "
                                 f"similarity; got gallery {r.gallery!r}, metric {r.metric!r}")
            require_faiss()
            index = {"config": IndexConfig(layer=r.layer, metric=r.metric).model_dump(mode="json"),
                     "features": gallery, "queries_from": held_out("train", split)}
        out["retrieval"] = {"settings": r.model_dump(mode="json", exclude={"chunk_size"}), "queries": split["test"].key,
                            "gallery": gallery, "index": index}
    if wanted.embedding_map.method != "none":
        from tasks.evaluate.projection import check_method

        check_method(wanted.embedding_map.method)
        out["embedding_map"] = {"settings": wanted.embedding_map.model_dump(mode="json"),
                                "splits": {s: f.key for s, f in split.items()}}
    return out


STAGE = Stage("evaluate", _plan, "tasks.evaluate.stage:evaluate", "evaluate", lambda c, w: f"evaluate-{c.name}",
              after=("extract", "quality", "heads", "finetune"), why=against("evaluate", per_experiment=True),
              stored=is_stored, section=Section("evaluate", EvaluateConfig, EvaluateConfig()),
              imports=frozenset({"data", "backbones", "heads", "index", "finetune"}))
