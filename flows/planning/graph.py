"""The experiment graph: which stages a run executes, in which order, and how each is planned.

The engine that plans and runs the declared stages. Each stage plans itself
from the config and the plans of the stages before it (keys only: cheap,
nothing computed), so ``transferpipe plan`` names every key a run writes, even
on an empty cache. :func:`run` executes the graph (the pipeline flow, and
through it sweeps, the demo and ``select``, which runs it up to the heads);
:func:`walk` plans it and runs nothing (``transferpipe plan``, flows/planning/explain.py).

The stages themselves are declared by their packages (tasks/stages.py lists them, flows/planning/nodes.py
derives each goal's path); this module is the engine that plans and runs them.

"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flows.planning.checks import check_inputs
from flows.config import ExperimentConfig
from flows.planning.nodes import Goal, nodes
from tasks.declare import Graph, Planned, Unit, Work
from tasks.declare import Stage as Node
from tasks.backbones.source import CodeNotRun
from tasks.data.errors import BadImageError

log = logging.getLogger("transferpipe.plan")


def _run_extract(config: ExperimentConfig, node: Node, works: list[Work]) -> list[Any]:
    """One task per split, or shards on Dask workers (``dask:``) when a split is not cached."""
    if config.dask is None or all(w.stored for w in works):
        return _run_tasks(config, node, works)
    from flows.execution.scale_out import sharded_extract

    done = sharded_extract(config, [w.plan for w in works])
    return [done[w.what] for w in works]


RUNNERS: dict[str, Callable[[ExperimentConfig, Node, list[Work]], list[Any]]] = {"extract": _run_extract}


def run(config: ExperimentConfig, goal: Goal = "evaluate") -> Graph:
    """Execute the graph: each stage planned from the results before it, then its tasks run (or hit the cache).

    Every stage is planned before the first computes where it can be, so a config
    that cannot run (no heads, no test split) fails before any work.
    """
    chosen, graph = nodes(config, goal), {}
    for node in chosen:
        works = node.plan(config, graph)
        if node.name == "extract":
            for note in check_inputs(config, chosen, works):
                log.warning("%s", note)
        for work, unit, why in _missing(config, node, works, first_only=True):
            log.info("%s %s: computing because %s", node.name, unit.what, "; ".join(why))
        graph[node.name] = Planned(works, RUNNERS.get(node.name, _run_tasks)(config, node, works))
    return graph


def _run_tasks(config: ExperimentConfig, node: Node, works: list[Work]) -> list[Any]:
    from flows.execution import stage_tasks

    task = stage_tasks.TASKS[node.name]
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
            steps += _walk(config, [n for n in nodes(config, extra) if n.name not in done], chosen, done)
    return steps


def _walk(config: ExperimentConfig, todo: list[Node], chosen: list[Node], graph: Graph) -> list[Step]:
    """:func:`walk` over the nodes ``todo``, adding their plans to ``graph``; ``chosen``: the run's nodes, whose
    inputs are checked once extraction is planned."""
    steps: list[Step] = []
    for node in todo:
        try:
            works = node.plan(config, graph)
        except CodeNotRun as exc:  # a dry run never runs a config's code: the first run computes from here on
            steps.append(Step(node.name, config.name, None, False, [f"computes, and so does every later stage: {exc}"]))
            break
        except ValueError as exc:
            steps.append(Step(node.name, config.name, None, False, [f"a run stops here: {exc}"]))
            break
        reasons = {(id(w), u.key): why for w, u, why in _missing(config, node, works)}
        steps += [Step(node.name, u.what, u.key, u.stored, reasons.get((id(w), u.key), []))
                  for w in works for u in node.units(w)]
        graph[node.name] = Planned(works)
        if node.name == "extract":
            try:
                steps += [Step("note", config.name, None, True, [note]) for note in check_inputs(config, chosen, works)]
            except ValueError as exc:
                steps.append(Step("check", config.name, None, False, [f"a run stops here: {exc}"]))
                break
    return steps
