"""The experiment graph's stages, derived from the one list in tasks/stages.py: which stages a run to a goal
executes, in which order, and which other goals ``plan`` walks.

A goal is a stage's name; its path is the stages its declaration comes ``after`` and then itself, each run
when its ``when`` says so (heads when the config has some, fine-tuning when enabled, quality with a
``quality:`` section); the goal's own stage always runs, and a stage that ``joins`` the goal follows it when
the config asks (``predict:`` after a run's evaluation).
"""
from __future__ import annotations

from flows.config import ExperimentConfig
from tasks.declare import Stage
from tasks.heads.configs import KNNConfig, LogisticConfig
from tasks.stages import BY_NAME, STAGES

Goal = str  # a stage's name


def stage(name: str) -> Stage:
    """The declared stage called ``name``; an unknown one lists the known."""
    if name not in BY_NAME:
        raise ValueError(f"no stage {name!r}; stages: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def path(goal: Goal) -> tuple[Stage, ...]:
    """Every stage a run to ``goal`` may pass through, in run order."""
    last = stage(goal)
    return tuple(s for s in STAGES if s.name in last.after) + (last,)


def nodes(config: ExperimentConfig, goal: Goal = "evaluate") -> list[Stage]:
    """The stages a run of ``config`` up to ``goal`` executes, in order: its path, then the stages that join a
    run to this goal when the config asks for them (``predict:`` after the evaluation)."""
    names = frozenset(s.name for s in path(goal))
    chosen = [s for s in path(goal) if s.name == goal or s.when(config, names)]
    return chosen + [s for s in STAGES if goal in s.joins and s.when(config, names) and s not in chosen]


def side_goals(config: ExperimentConfig) -> tuple[Goal, ...]:
    """The goals besides a run that ``plan`` walks for this config: each side stage whose section it has."""
    return tuple(s.name for s in STAGES if s.side_goal and s.section and getattr(config, s.section.name) is not None)


def candidates(config: ExperimentConfig) -> list[tuple[str, ExperimentConfig]]:
    """``select:``'s candidates, each as an experiment: its backbone with the logistic and kNN probes."""
    if config.select is None:
        raise ValueError(f"experiment {config.name!r} has no select: section listing candidate backbones")
    layer = config.select.layer
    probes = [LogisticConfig(kind="logistic", layer=layer), KNNConfig(kind="knn", layer=layer)]
    return [(c.label, config.model_copy(update={"name": f"{config.name}-{c.label}", "backbone": c.backbone,
                                                "heads": probes})) for c in config.select.candidates]

