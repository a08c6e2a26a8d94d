"""A stage declares itself once: one :class:`Stage` record in its package's ``plan.py``, listed in
``tasks/stages.py``; flows/ derives everything else from that list.

A stage's record says what flows/ would otherwise be told in nine places: its config section and model, the
stages it comes after (a goal's path), when it runs on the way to another goal, how it is planned (keys only,
nothing computed), the function that runs it (named, so plan and run modules do not import each other), its
Prefect task's name, its device needs, how ``plan`` lists and explains its units, and its command. The cache
folder its files live in is declared by its files class (storage/records.py: ``StageFiles`` subclasses name
their folder), so storage/ finds it from what it stores.

Planners take the experiment config (duck-typed: ``flows.config.ExperimentConfig``) and the plans (or
results) of the stages before them as a :data:`Graph`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage.keys import closest
from storage.records import stored_specs


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
class Planned:
    """A stage of one run: its work as planned and, once it ran, its results (in the same order)."""

    works: list[Work]
    results: list[Any] | None = None

    def plans(self) -> list[Any]:
        return [w.plan for w in self.works]


Graph = dict[str, Planned]  # by stage name, in the order the stages run

Why = Callable[[Any, list[tuple[Work, Unit]]], list[list[str]]]


@dataclass(frozen=True)
class Section:
    """A stage's section of the experiment config: its pydantic type and default (a ``Field``)."""

    name: str
    model: Any
    default: Any


@dataclass(frozen=True)
class Command:
    """A stage's plain command, ``transferpipe <name> CONFIG [--flag ...]``, derived by flows/cli.py: ``flags``
    are fields of the stage's section model given on the command line (they override the config's section);
    ``show`` turns the stage's results into a table (title, headers, rows) and the lines printed below it."""

    help: str
    flags: tuple[str, ...] = ()
    data_flag: bool = False  #: ``--data PATH``: the section's ``data`` read from a folder, table file or shards
    out_flag: bool = False  #: ``--out FILE``: the result's ``path`` copied there (atomically)
    #: ``--out DIR`` instead: the result's ``folder`` copied there, refused when it exists unless ``--force``
    out_folder: bool = False
    show: Callable[[Any, list[Any]], tuple[str, list[str], list[list[Any]], list[str]]] | None = None


def always(config: Any, path: frozenset[str]) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the experiment graph, declared once by its package."""

    name: str  #: its node, goal and ``plan`` label
    plan: Callable[[Any, Graph], list[Work]]  #: config + the graph so far -> its task calls, keys only
    run: str  #: ``module:function`` computing one plan (imported only when the graph runs)
    task: str  #: its Prefect task's name (part of the Prefect cache key: never rename)
    run_name: Callable[[Any, Work], str]  #: the task run's name in the UI
    after: tuple[str, ...] = ()  #: every stage a run to this goal passes through first, in order
    #: goals whose runs also end with this stage when its ``when`` holds (``predict:`` makes ``run`` predict)
    joins: tuple[str, ...] = ()
    section: Section | None = None  #: its config section
    #: whether it runs in a run whose path holds these stages (always when it is the goal itself)
    when: Callable[[Any, frozenset[str]], bool] = always
    #: what ``plan`` lists for one task call (default: the call itself)
    units: Callable[[Work], list[Unit]] = lambda w: [Unit(w.what, w.plan.key, w.stored, w.plan.spec)]
    #: why each missing unit computes, in one call per stage (the stored specs are read once)
    why: Why = lambda c, m: [[] for _ in m]
    concurrent: bool = False  #: its task calls run at once (threads)
    #: a goal ``plan`` also walks when the config has this stage's section (``export:``, ``index:``)
    side_goal: bool = False
    #: the device a plan computes on, for a stage that holds a GPU's slot while it runs (flows/execution/device_slots.py)
    device: Callable[[Any], str] | None = None
    stored: Callable[[Any], bool] = lambda plan: False  #: whether the store holds a plan's output
    command: Command | None = None  #: a plain command derived from this record (None: flows/cli.py has its own)
    #: the stage packages of tasks/ this one's package may import (tests/test_architecture.py)
    imports: frozenset[str] = field(default_factory=frozenset)

    @property
    def package(self) -> str:
        """The package under tasks/ that declares it (``tasks.quality.plan`` -> ``quality``)."""
        return self.plan.__module__.split(".")[1]


def features(graph: Graph) -> dict[str, Any]:
    """Each split's extraction (plan or result: both have ``key`` and ``manifest``), by split name."""
    stage = graph["extract"]
    return {w.what: r for w, r in zip(stage.works, stage.results or stage.plans())}


def check_layer(config: Any, field_name: str, layer: str) -> None:
    """A layer a later stage reads must be one the extraction stores."""
    if layer not in config.backbone.layers:
        raise ValueError(f"{field_name}: {layer!r} is not extracted; backbone.layers: "
                         f"{', '.join(config.backbone.layers)} (add it there to extract it)")


def held_out(indexed: str, split: dict[str, Any]) -> str | None:
    """The split whose rows measure an index's recall: test, else val, never the indexed split itself."""
    other = next((s for s in ("test", "val") if s in split and s != indexed), None)
    return split[other].key if other else None


def why_not_cached(spec: dict[str, Any], stored: list[dict[str, Any]]) -> list[str]:
    """What differs from the closest stored spec of the same kind, or that there is none."""
    found = closest(spec, stored)
    return ["never computed"] if found is None else (found[1] or ["the cached entry is incomplete"])


def against(kind: str, damage: Callable[[Work, Unit], list[str]] = lambda w, u: [], per_experiment: bool = False
            ) -> Why:
    """A ``why`` that says what is damaged where something is, else compares each missing unit with the closest
    of the stored specs of ``kind`` (storage.records.stored_specs; ``per_experiment``: the experiment's own)."""
    def why(config: Any, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
        specs = stored_specs(config.cache_dir, kind, config.name if per_experiment else "*") if missing else []
        return [damage(w, u) or why_not_cached(u.spec, specs) for w, u in missing]

    return why
