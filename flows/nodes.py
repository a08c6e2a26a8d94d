"""The stages of the experiment graph, one :class:`Node` record each: how it is planned (from the config and
the plans before it: keys only, nothing computed), named, explained and which config section asks for it.

:data:`NODES` lists every stage; :data:`PATHS` the stages each goal runs through. Adding a stage: its
package under ``tasks/`` (plan + stage), its key (``storage/keys.py``), its folder (``storage/layout.py``),
its Prefect task (``flows/stage_tasks.py``), one ``Node`` here with its place in ``PATHS``, and its
command; ``plan``, the run and ``tests/test_graph.py``'s plan-equals-run case then cover it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from flows.config import ExperimentConfig
from flows.why import why_features, why_not_cached
from storage import head_store
from storage.records import stored_specs
from tasks.backbones.config import resolve
from tasks.data.manifest import Manifest
from tasks.evaluate import plan as evaluate
from tasks.evaluate.plan import ModelToEvaluate
from tasks.export import stage as export
from tasks.extract import plan as extract
from tasks.finetune import plan as finetune
from tasks.heads import stage as heads
from tasks.heads.configs import KNNConfig, LogisticConfig
from tasks.result import summarize
from tasks.select import stage as select

Goal = Literal["extract", "heads", "finetune", "evaluate", "score", "export", "index", "quality"]


@dataclass(frozen=True)
class Work:
    """One task call of a stage: its plan (with ``key`` and ``spec``) and whether the store holds its output."""

    what: str
    plan: Any
    stored: bool


@dataclass(frozen=True)
class Unit:
    """One artifact a stage writes, as ``plan`` lists it: a split's features, one head fit, a fine-tune, a report."""

    what: str
    key: str
    stored: bool
    spec: dict[str, Any]


@dataclass
class Stage:
    """A stage of one run: its work as planned and, once it ran, its results (in the same order)."""

    works: list[Work]
    results: list[Any] | None = None

    def plans(self) -> list[Any]:
        return [w.plan for w in self.works]


Graph = dict[str, Stage]  # by stage name, in the order the stages run


@dataclass(frozen=True)
class Node:
    """A stage of the graph: how it is planned, named, explained and run."""

    stage: str
    plan: Callable[[ExperimentConfig, Graph], list[Work]]
    task: str  # its Prefect task in flows/stage_tasks.py, imported only when the graph runs
    run_name: Callable[[ExperimentConfig, Work], str]
    units: Callable[[Work], list[Unit]] = lambda w: [Unit(w.what, w.plan.key, w.stored, w.plan.spec)]
    #: why each missing unit computes, in one call per stage (the stored specs are read once)
    why: Callable[[ExperimentConfig, list[tuple[Work, Unit]]], list[list[str]]] = lambda c, m: [[] for _ in m]
    concurrent: bool = False  # its task calls run at once (threads)
    #: a goal of its own (a command) that ``plan`` also walks when the config has this section
    section: str | None = None


def _plan_extract(config: ExperimentConfig, graph: Graph) -> list[Work]:
    plans = extract.plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    return [Work(split, plan, extract.is_stored(plan)) for split, plan in plans.items()]


def _why_features(config: ExperimentConfig, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
    return [why_features(config.cache_dir, w.what, w.plan.manifest, u.spec, w.plan.pieces) for w, u in missing]


def features(graph: Graph) -> dict[str, Any]:
    """Each split's extraction (plan or result: both have ``key`` and ``manifest``), by split name."""
    stage = graph["extract"]
    return {w.what: r for w, r in zip(stage.works, stage.results or stage.plans())}


def _plan_heads(config: ExperimentConfig, graph: Graph) -> list[Work]:
    if not config.heads:
        raise ValueError(f"experiment {config.name!r} has no heads: add a heads: list to its config")
    keys = {split: f.key for split, f in features(graph).items()}
    wanted = config.quality is not None and config.quality.exclude and "quality" in graph
    cleaned = graph["quality"].works[0].plan.key if wanted else None
    return [Work(p.label, p, heads.is_stored(p))
            for p in heads.plan_for_splits(config.heads, keys, config.cache_dir, exclude=cleaned)]


def _head_units(work: Work) -> list[Unit]:
    plan = work.plan
    return [Unit(f"{plan.label} shot {shot} seed {seed}", key, head_store.head_exists(plan.cache_dir, key),
                 heads.fit_spec(plan, shot, seed)) for shot, seed, key in heads.fits(plan)]


def _plan_finetune(config: ExperimentConfig, graph: Graph) -> list[Work]:
    split = features(graph)
    probes = heads.probe_candidates(graph["heads"].plans()) if "heads" in graph else []
    spec, feature_keys = resolve(config.backbone, config.cache_dir), {s: f.key for s, f in split.items()}
    works = []
    for label, cfg in config.finetune.candidates():  # one run, or one per combination of finetune.search
        plan = finetune.plan_finetune(cfg, spec, split["train"].manifest, config.cache_dir, feature_keys, probes)
        works.append(Work(label or config.backbone.name, plan, finetune.is_stored(plan)))
    return works


def _probe_kept(best: Any) -> dict[str, float] | None:
    """When no epoch of the chosen fine-tuning run (its result) beat the probe it started from on validation: the
    numbers the report gives for it (None when fine-tuning won)."""
    if best.best_epoch != 0:
        return None
    later = [h.val_accuracy for h in best.history if h.epoch > 0]
    return {"probe_val_accuracy": best.best_val_accuracy, "best_tuned_val_accuracy": max(later) if later else None}


def _chosen_finetune(graph: Graph) -> tuple[int, list[dict[str, Any]]]:
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


def _plan_evaluate(config: ExperimentConfig, graph: Graph) -> list[Work]:
    split, test = features(graph), test_split(graph)
    seconds = {rec.key: rec.seconds for r in (graph["heads"].results or []) for rec in r.records} if "heads" in graph else {}
    models = [ModelToEvaluate(name=p.label, kind=p.head.kind, layer=p.head.layer, shot=shot, seed=seed,
                              head_key=key, train_seconds=seconds.get(key, 0.0))
              for p in (graph["heads"].plans() if "heads" in graph else []) for shot, seed, key in heads.fits(p)]
    tuning, tried, kept = None, [], None
    if "finetune" in graph:
        index, tried = _chosen_finetune(graph)
        tuning, tuned = graph["finetune"].works[index], graph["finetune"].results
        kept = _probe_kept(tuned[index]) if tuned else None
        models.append(ModelToEvaluate(name="finetuned", kind="finetune", checkpoint=finetune.run_files(tuning.plan).best,
                                      train_seconds=sum(r.train_seconds for r in tuned) if tuned else 0.0,
                                      tried=[t["key"] for t in tried]))
    if not models:
        raise ValueError(f"experiment {config.name!r} has nothing to evaluate: add heads or enable finetune")
    context = {
        "config": config.model_dump(mode="json"),
        "stages": {name: summarize(s.results) for name, s in graph.items() if s.results},
        "keys": {"features": {s: f.key for s, f in split.items()},
                 "heads": {m.name if m.shot == "all" else f"{m.name} shot {m.shot} seed {m.seed}": m.head_key
                           for m in models if m.head_key},
                 "finetune": tuning.plan.key if tuning else None,
                 "quality": graph["quality"].works[0].plan.key if "quality" in graph else None},
        "finetune_search": tried,
        "finetune_probe": kept,
    }
    plan = evaluate.plan_evaluation(
        config.name, test.key, test.manifest, config.cache_dir, resolve(config.backbone, config.cache_dir),
        Manifest.load(test.manifest).classes, models, device=config.extract.device, context=context,
        quality=graph["quality"].works[0].plan.key if "quality" in graph else None, **feature_reports(config, split),
    )
    return [Work(config.name, plan, evaluate.is_stored(plan))]


def feature_reports(config: ExperimentConfig, split: dict[str, Any]) -> dict[str, Any]:
    """What the evaluation computes from features besides the models: retrieval (evaluate.retrieval) and the
    embedding map (evaluate.embedding_map), each as its settings and the feature keys it reads."""
    wanted, out = config.evaluate, {}
    if wanted.retrieval is not None:
        _check_layer(config, "evaluate.retrieval.layer", wanted.retrieval.layer)
    _check_layer(config, "evaluate.embedding_map.layer", wanted.embedding_map.layer)
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
                     "features": gallery, "queries_from": _held_out("train", split)}
        out["retrieval"] = {"settings": r.model_dump(mode="json", exclude={"chunk_size"}), "queries": split["test"].key,
                            "gallery": gallery, "index": index}
    if wanted.embedding_map.method != "none":
        from tasks.evaluate.projection import check_method

        check_method(wanted.embedding_map.method)
        out["embedding_map"] = {"settings": wanted.embedding_map.model_dump(mode="json"),
                                "splits": {s: f.key for s, f in split.items()}}
    return out


def _plan_score(config: ExperimentConfig, graph: Graph) -> list[Work]:
    if config.select is None:
        raise ValueError(f"experiment {config.name!r} has no select: section listing candidate backbones")
    plan = select.plan_scores(config.name, features(graph)["train"].key, config.select.layer, config.cache_dir,
                              resolve(config.backbone, config.cache_dir))
    return [Work(config.name, plan, select.is_stored(plan))]


def _plan_export(config: ExperimentConfig, graph: Graph) -> list[Work]:
    split, wanted = features(graph), config.export or export.ExportConfig()
    unknown = [s for s in wanted.splits if s not in split]
    if unknown:
        raise ValueError(f"export.splits: no split {unknown[0]!r} in this config; its splits: {', '.join(split)}")
    _check_layer(config, "export.layer", wanted.layer)
    plans = [export.plan_export(wanted, s, split[s].key, config.cache_dir) for s in wanted.splits or list(split)]
    return [Work(p.split, p, export.is_stored(p)) for p in plans]


def _check_layer(config: ExperimentConfig, field: str, layer: str) -> None:
    """A layer a later stage reads must be one the extraction stores."""
    if layer not in config.backbone.layers:
        raise ValueError(f"{field}: {layer!r} is not extracted; backbone.layers: {', '.join(config.backbone.layers)} "
                         "(add it there to extract it)")


def _held_out(indexed: str, split: dict[str, Any]) -> str | None:
    """The split whose rows measure an index's recall: test, else val, never the indexed split itself."""
    other = next((s for s in ("test", "val") if s in split and s != indexed), None)
    return split[other].key if other else None


def _plan_index(config: ExperimentConfig, graph: Graph) -> list[Work]:
    from tasks.index import plan as index

    split, wanted = features(graph), config.index or index.IndexConfig()
    name = wanted.split
    if name not in split:
        raise ValueError(f"--split {name!r}: no such split in this config; its splits: {', '.join(split)}")
    _check_layer(config, "index.layer", wanted.layer)
    index.require_faiss()
    plan = index.plan_index(wanted, name, split[name].key, config.cache_dir, _held_out(name, split))
    return [Work(name, plan, index.is_sound(plan))]


def _plan_quality(config: ExperimentConfig, graph: Graph) -> list[Work]:
    from tasks.quality import plan as quality

    split, wanted = features(graph), config.quality or quality.QualityConfig()
    if "train" not in split:
        raise ValueError("quality: needs a train split")
    _check_layer(config, "quality.layer", wanted.layer)
    plan = quality.plan_quality(wanted, {s: f.key for s, f in split.items()}, split["train"].manifest,
                                config.cache_dir, config.name)
    return [Work(config.name, plan, quality.is_stored(plan))]


def candidates(config: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """``select:``'s candidates, each as an experiment: its backbone with the logistic and kNN probes."""
    if config.select is None:
        raise ValueError(f"experiment {config.name!r} has no select: section listing candidate backbones")
    layer = config.select.layer
    probes = [LogisticConfig(kind="logistic", layer=layer), KNNConfig(kind="knn", layer=layer)]
    return [(c.label, config.model_copy(update={"name": f"{config.name}-{c.label}", "backbone": c.backbone,
                                                "heads": probes})) for c in config.select.candidates]


def _against(stored_specs: Callable[[ExperimentConfig], list[dict[str, Any]]],
             damage: Callable[[Work, Unit], list[str]] = lambda w, u: []):
    """A ``why`` that says what is damaged where something is, else compares each missing unit with the closest
    of the stage's stored specs."""
    def why(config: ExperimentConfig, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
        specs = stored_specs(config) if missing else []
        return [damage(w, u) or why_not_cached(u.spec, specs) for w, u in missing]

    return why


def _head_damage(work: Work, unit: Unit) -> list[str]:
    problem = head_store.head_problem(work.plan.cache_dir, unit.key)
    return [f"head {problem}: will train again"] if problem and problem != "missing" else []


EXTRACT = Node("extract", _plan_extract, "extract_split_task", lambda c, w: f"extract-{c.backbone.name}-{w.what}",
               why=_why_features)


HEADS = Node("heads", _plan_heads, "train_head_task", lambda c, w: f"head-{w.plan.label}-{w.plan.head.layer}",
             units=_head_units, why=_against(lambda c: stored_specs(c.cache_dir, "heads"), _head_damage),
             concurrent=True)


FINETUNE = Node("finetune", _plan_finetune, "finetune_task",
                lambda c, w: f"finetune-{c.backbone.name}" + ("" if w.what == c.backbone.name else f" {w.what}"),
                why=_against(lambda c: stored_specs(c.cache_dir, "finetune"),
                             lambda w, u: finetune.run_files(w.plan).problems()))


EVALUATE = Node("evaluate", _plan_evaluate, "evaluate_task", lambda c, w: f"evaluate-{c.name}",
                why=_against(lambda c: stored_specs(c.cache_dir, "evaluate", c.name)))


SCORE = Node("score", _plan_score, "score_task", lambda c, w: f"score-{w.what}",
             why=_against(lambda c: stored_specs(c.cache_dir, "scores")))


EXPORT = Node("export", _plan_export, "export_task", lambda c, w: f"export-{w.what}-{w.plan.format}",
               units=lambda w: [Unit(f"{w.what} {w.plan.format} {w.plan.layer}", w.plan.key, w.stored, w.plan.spec)],
               why=_against(lambda c: stored_specs(c.cache_dir, "export")), section="export")


INDEX = Node("index", _plan_index, "index_task", lambda c, w: f"index-{w.what}-{w.plan.config.kind}",
              units=lambda w: [Unit(f"{w.what} {w.plan.config.kind} {w.plan.config.metric}", w.plan.key, w.stored,
                                    w.plan.spec)],
              why=_against(lambda c: stored_specs(c.cache_dir, "index")), section="index")


QUALITY = Node("quality", _plan_quality, "quality_task", lambda c, w: f"quality-{c.name}",
                why=_against(lambda c: stored_specs(c.cache_dir, "quality")))

#: every stage of the graph
NODES: tuple[Node, ...] = (EXTRACT, HEADS, FINETUNE, EVALUATE, SCORE, EXPORT, INDEX, QUALITY)


#: the stages each goal runs through, in order; heads and fine-tuning only where the config (or the goal) asks
PATHS: dict[str, tuple[Node, ...]] = {
    "extract": (EXTRACT,),
    "heads": (EXTRACT, QUALITY, HEADS),  # quality only for quality.exclude (it names the rows to leave out)
    "finetune": (EXTRACT, QUALITY, HEADS, FINETUNE),
    "evaluate": (EXTRACT, QUALITY, HEADS, FINETUNE, EVALUATE),  # quality when the config has a quality: section
    "score": (EXTRACT, HEADS, SCORE),  # one select candidate: features, probes, transferability scores
    "export": (EXTRACT, EXPORT),
    "index": (EXTRACT, INDEX),
    "quality": (EXTRACT, QUALITY),
}


def nodes(config: ExperimentConfig, goal: Goal = "evaluate") -> list[Node]:
    """The stages a run of ``config`` up to ``goal`` executes, in order.

    Heads run when the config has some, fine-tuning when ``finetune.enabled``, quality with a ``quality:``
    section (before heads and fine-tuning only with ``quality.exclude``, which names the rows the cleaned heads
    leave out); the ``goal`` stage runs even when the config leaves it out.
    """
    quality = config.quality is not None and (goal in ("evaluate", "quality") or config.quality.exclude)
    optional = {HEADS: bool(config.heads), FINETUNE: config.finetune.enabled, QUALITY: quality}
    return [node for node in PATHS[goal] if optional.get(node, True) or node.stage == goal]


def side_goals(config: ExperimentConfig) -> tuple[Goal, ...]:
    """The goals besides a run that ``plan`` walks for this config: each stage with a section the config has."""
    return tuple(n.stage for n in NODES if n.section and getattr(config, n.section) is not None)  # type: ignore[misc]
