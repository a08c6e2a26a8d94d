"""The experiment graph: which stages a run executes, in which order, and how each is planned.

This is the only module that orders stages. Each :class:`Node` plans its stage
from the config and the plans of the stages before it (keys only: cheap,
nothing computed), so ``transferpipe plan`` names every key a run writes, even
on an empty cache. :func:`run` executes the graph (the pipeline flow, and
through it sweeps, the demo and ``select``, which runs it up to the heads);
:func:`walk` plans it and runs nothing (``transferpipe plan``, flows/explain.py).

Adding a stage: its task module (``tasks/``), its key (``storage/keys.py``), its
folder (``storage/layout.py``), its Prefect task (``flows/stage_tasks.py``), one
:class:`Node` below with its place in :func:`nodes`, and its CLI command.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from flows.config import ExperimentConfig
from flows.why import why_features, why_not_cached
from storage import head_store
from storage.records import stored_specs
from tasks.backbones.config import module_names, resolve
from tasks.backbones.source import CodeNotRun
from tasks.data.errors import BadImageError
from tasks.data.manifest import Manifest
from tasks.evaluate import plan as evaluate
from tasks.evaluate.plan import ModelToEvaluate
from tasks.export import stage as export
from tasks.extract import plan as extract
from tasks.finetune import plan as finetune
from tasks.heads import stage as heads
from tasks.heads.configs import KNNConfig, LogisticConfig
from tasks.machine import cuda_possible
from tasks.result import summarize
from tasks.select import stage as select

Goal = Literal["extract", "heads", "finetune", "evaluate", "score", "export", "index"]

log = logging.getLogger("transferpipe.plan")


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


# --------------------------------------------------------------------------- the stages


def _plan_extract(config: ExperimentConfig, graph: Graph) -> list[Work]:
    plans = extract.plan_extraction(config.data, config.backbone, config.extract, config.cache_dir)
    return [Work(split, plan, extract.is_stored(plan)) for split, plan in plans.items()]


def _why_features(config: ExperimentConfig, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
    return [why_features(config.cache_dir, w.what, w.plan.manifest, u.spec, w.plan.pieces) for w, u in missing]


def _run_extract(config: ExperimentConfig, node: Node, works: list[Work]) -> list[Any]:
    """One task per split, or shards on Dask workers (``dask:``) when a split is not cached."""
    if config.dask is None or all(w.stored for w in works):
        return _run_tasks(config, node, works)
    from flows.scale_out import sharded_extract

    done = sharded_extract(config, [w.plan for w in works])
    return [done[w.what] for w in works]


def features(graph: Graph) -> dict[str, Any]:
    """Each split's extraction (plan or result: both have ``key`` and ``manifest``), by split name."""
    stage = graph["extract"]
    return {w.what: r for w, r in zip(stage.works, stage.results or stage.plans())}


def _plan_heads(config: ExperimentConfig, graph: Graph) -> list[Work]:
    if not config.heads:
        raise ValueError(f"experiment {config.name!r} has no heads: add a heads: list to its config")
    keys = {split: f.key for split, f in features(graph).items()}
    return [Work(p.head.label, p, heads.is_stored(p)) for p in heads.plan_for_splits(config.heads, keys, config.cache_dir)]


def _head_units(work: Work) -> list[Unit]:
    plan = work.plan
    return [Unit(f"{plan.head.label} shot {shot} seed {seed}", key, head_store.head_exists(plan.cache_dir, key),
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


def _test_split(graph: Graph) -> Any:
    found = features(graph).get("test")
    if found is None:
        raise ValueError("the pipeline evaluates on a test split: set data.test_fraction > 0 or add a test folder")
    return found


def _plan_evaluate(config: ExperimentConfig, graph: Graph) -> list[Work]:
    split, test = features(graph), _test_split(graph)
    seconds = {rec.key: rec.seconds for r in (graph["heads"].results or []) for rec in r.records} if "heads" in graph else {}
    models = [ModelToEvaluate(name=p.head.label, kind=p.head.kind, layer=p.head.layer, shot=shot, seed=seed,
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
        "keys": {"features": {s: f.key for s, f in split.items()}, "heads": {m.name: m.head_key for m in models},
                 "finetune": tuning.plan.key if tuning else None},
        "finetune_search": tried,
        "finetune_probe": kept,
    }
    plan = evaluate.plan_evaluation(
        config.name, test.key, test.manifest, config.cache_dir, resolve(config.backbone, config.cache_dir),
        Manifest.load(test.manifest).classes, models, device=config.extract.device, context=context,
        **_feature_reports(config, split),
    )
    return [Work(config.name, plan, evaluate.is_stored(plan))]


def _feature_reports(config: ExperimentConfig, split: dict[str, Any]) -> dict[str, Any]:
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
HEADS = Node("heads", _plan_heads, "train_head_task", lambda c, w: f"head-{w.plan.head.label}-{w.plan.head.layer}",
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
               why=_against(lambda c: stored_specs(c.cache_dir, "export")))
INDEX = Node("index", _plan_index, "index_task", lambda c, w: f"index-{w.what}-{w.plan.config.kind}",
              units=lambda w: [Unit(f"{w.what} {w.plan.config.kind} {w.plan.config.metric}", w.plan.key, w.stored,
                                    w.plan.spec)],
              why=_against(lambda c: stored_specs(c.cache_dir, "index")))
RUNNERS: dict[str, Callable[[ExperimentConfig, Node, list[Work]], list[Any]]] = {"extract": _run_extract}


#: the stages each goal runs through, in order; heads and fine-tuning only where the config (or the goal) asks
PATHS: dict[str, tuple[Node, ...]] = {
    "extract": (EXTRACT,),
    "heads": (EXTRACT, HEADS),
    "finetune": (EXTRACT, HEADS, FINETUNE),
    "evaluate": (EXTRACT, HEADS, FINETUNE, EVALUATE),
    "score": (EXTRACT, HEADS, SCORE),  # one select candidate: features, probes, transferability scores
    "export": (EXTRACT, EXPORT),
    "index": (EXTRACT, INDEX),
}


def nodes(config: ExperimentConfig, goal: Goal = "evaluate") -> list[Node]:
    """The stages a run of ``config`` up to ``goal`` executes, in order.

    Heads run when the config has some, fine-tuning when ``finetune.enabled``;
    the ``goal`` stage runs even when the config leaves it out.
    """
    optional = {HEADS: bool(config.heads), FINETUNE: config.finetune.enabled}
    return [node for node in PATHS[goal] if optional.get(node, True) or node.stage == goal]


# --------------------------------------------------------------------------- run and walk


def run(config: ExperimentConfig, goal: Goal = "evaluate") -> Graph:
    """Execute the graph: each stage planned from the results before it, then its tasks run (or hit the cache).

    Every stage is planned before the first computes where it can be, so a config
    that cannot run (no heads, no test split) fails before any work.
    """
    chosen, graph = nodes(config, goal), {}
    for node in chosen:
        works = node.plan(config, graph)
        if node is EXTRACT:
            for note in _check_inputs(config, chosen, works):
                log.warning("%s", note)
        for work, unit, why in _missing(config, node, works, first_only=True):
            log.info("%s %s: computing because %s", node.stage, unit.what, "; ".join(why))
        graph[node.stage] = Stage(works, RUNNERS.get(node.stage, _run_tasks)(config, node, works))
    return graph


def _check_inputs(config: ExperimentConfig, chosen: list[Node], extraction: list[Work]) -> list[str]:
    """What the later stages need, checked before anything computes: a test split, heads to train, few-shot
    counts the classes can give, modules to unfreeze, the splits and layers later stages read, the devices asked
    for. Raises for what stops a run; returns notes on what it runs without (classes with no image in a split)."""
    planned = {"extract": Stage(extraction)}
    manifest = Manifest.load(features(planned)["train"].manifest)  # one file holds every split: read it once
    devices = {"extract.device": config.extract.device}
    if HEADS in chosen:
        _plan_heads(config, planned)
        _check_shots(config, manifest)
        devices |= {f"heads.{h.label}.device": h.device for h in config.heads if hasattr(h, "device")}
    if FINETUNE in chosen:
        devices["finetune.device"] = config.finetune.device
        _check_unfreeze(config)
    if EVALUATE in chosen:
        _feature_reports(config, features(planned) | {"test": _test_split(planned)})
    if EXPORT in chosen:
        _plan_export(config, planned)
    if INDEX in chosen:
        _plan_index(config, planned)
    wanted = {field: device for field, device in devices.items() if device.startswith("cuda")}
    if wanted and not cuda_possible():
        field, device = next(iter(wanted.items()))
        raise ValueError(f"{field} {device!r} is requested but torch sees no CUDA device; use auto or cpu")
    return _empty_classes(manifest)


def _empty_classes(manifest: Manifest) -> list[str]:
    """Classes with no image in a split the run uses: named, since their metrics (test) or the chosen settings
    (val) cannot reflect them."""
    notes = []
    for split in manifest.splits:
        if split == "train":
            continue  # a fraction split keeps one training image per class; a folder split with none fails later
        have = Counter(label for _, label in manifest.splits[split])
        empty = [name for i, name in enumerate(manifest.classes) if not have[i]]
        if empty:
            shown = ", ".join(repr(n) for n in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            notes.append(f"data: {len(empty)} class(es) have no {split} image: {shown} (too few images for "
                         f"{split}_fraction, or an empty {split} folder); "
                         + ("their test accuracy is left out of the report" if split == "test" else
                            "settings are chosen on val without them"))
    return notes


def _check_shots(config: ExperimentConfig, train: Manifest) -> None:
    counts = Counter(label for _, label in train.splits["train"])
    fewest, label = min((counts[i], i) for i in range(len(train.classes)))
    for head in config.heads:
        too_many = [s for s in head.shots if s != "all" and s > fewest]
        if too_many:
            raise ValueError(f"heads: {head.label} asks for {too_many[0]} labels per class, but class "
                             f"{train.classes[label]!r} has {fewest} training image(s); use at most {fewest}, or 'all'")


def _check_unfreeze(config: ExperimentConfig) -> None:
    for _, cfg in config.finetune.candidates():
        _check_modules(config, cfg.unfreeze if cfg.last_n is None else "all")


def _check_modules(config: ExperimentConfig, unfreeze: list[str] | str) -> None:
    if unfreeze == "all":
        return
    names = set(module_names(config.backbone, config.cache_dir))
    bad = [n for n in unfreeze if n not in names]
    if bad:
        top = [n for n in sorted(names) if n and "." not in n]
        raise ValueError(f"finetune.unfreeze: unknown module(s) {bad}; top-level modules of {config.backbone.name}: "
                         f"{', '.join(top)} (dotted names reach inside)")


def _run_tasks(config: ExperimentConfig, node: Node, works: list[Work]) -> list[Any]:
    from flows import stage_tasks

    task = getattr(stage_tasks, node.task)
    if node.concurrent:
        futures = [stage_tasks.submit_stage(task, w.plan, config, stored=w.stored, name=node.run_name(config, w))
                   for w in works]
        calls = [f.result for f in futures]
    else:
        calls = [functools.partial(stage_tasks.run_stage, task, w.plan, config, stored=w.stored,
                                   name=node.run_name(config, w)) for w in works]
    results, bad = [], []
    for call in calls:
        try:
            results.append(call())
        except stage_tasks.StageInputError as exc:
            if not isinstance(exc.__cause__, BadImageError):
                raise
            bad.append(exc)  # the other splits still run: one failed run names every undecodable image
    if bad:
        names = ", ".join(e.stage for e in bad)
        joined = BadImageError.joined([e.__cause__ for e in bad])
        raise stage_tasks.StageInputError(f"stage{'s' if len(bad) > 1 else ''} {names} failed: {joined}",
                                          stage=names) from joined
    return results


def _missing(config: ExperimentConfig, node: Node, works: list[Work],
             first_only: bool = False) -> Iterator[tuple[Work, Unit, list[str]]]:
    """Each unit the store lacks (``first_only``: the first of each task call) and why it computes."""
    missing = []
    for work in (w for w in works if not w.stored):
        units = [u for u in node.units(work) if not u.stored] or node.units(work)[:1]
        missing += [(work, u) for u in (units[:1] if first_only else units)]
    for (work, unit), why in zip(missing, node.why(config, missing)):
        yield work, unit, why


@dataclass(frozen=True)
class Step:
    """One line of ``transferpipe plan``: a unit a run would write, cached or not, and why it computes."""

    stage: str
    what: str
    key: str | None
    cached: bool
    why: list[str]


def walk(config: ExperimentConfig, goal: Goal = "evaluate", also: tuple[Goal, ...] = ()) -> list[Step]:
    """Plan the graph as :func:`run` would and run nothing: every unit, cached or not, and why.

    A stage whose planning fails (no heads, no test split) is listed with the error a run would stop on.
    ``also``: other goals' later stages (``export``, ``index``), planned from the same extraction plans (a
    dataset is scanned once).
    """
    chosen, graph = nodes(config, goal), {}
    steps = _walk(config, chosen, chosen, graph)
    for extra in also:
        if "extract" in graph:
            done = {"extract": graph["extract"]}
            steps += _walk(config, [n for n in nodes(config, extra) if n.stage not in done], chosen, done)
    return steps


def _walk(config: ExperimentConfig, todo: list[Node], chosen: list[Node], graph: Graph) -> list[Step]:
    """:func:`walk` over the nodes ``todo``, adding their plans to ``graph``; ``chosen``: the run's nodes, whose
    inputs are checked once extraction is planned."""
    steps: list[Step] = []
    for node in todo:
        try:
            works = node.plan(config, graph)
        except CodeNotRun as exc:  # a dry run never runs a config's code: the first run computes from here on
            steps.append(Step(node.stage, config.name, None, False, [f"computes, and so does every later stage: {exc}"]))
            break
        except ValueError as exc:
            steps.append(Step(node.stage, config.name, None, False, [f"a run stops here: {exc}"]))
            break
        reasons = {(id(w), u.key): why for w, u, why in _missing(config, node, works)}
        steps += [Step(node.stage, u.what, u.key, u.stored, reasons.get((id(w), u.key), []))
                  for w in works for u in node.units(w)]
        graph[node.stage] = Stage(works)
        if node is EXTRACT:
            try:
                steps += [Step("note", config.name, None, True, [note]) for note in _check_inputs(config, chosen, works)]
            except ValueError as exc:
                steps.append(Step("check", config.name, None, False, [f"a run stops here: {exc}"]))
                break
    return steps
