"""``transferpipe plan``: the experiment graph planned as a run would plan it, with nothing run.

Every unit a run would write (each split's features, each head fit, the
fine-tune, the evaluation) with its key, whether the cache holds it and, if
not, why: the key fields that differ from the closest cached entry (data
changes as files added, removed or changed), or "never computed". The graph
(flows/planning/graph.py) is the same one ``run`` executes, so the two cannot disagree.
"""
from __future__ import annotations

from flows.config import ExperimentConfig
from flows.planning.graph import Step, walk
from flows.planning.nodes import candidates, side_goals
from storage.keys import short



def explain(config: ExperimentConfig) -> list[Step]:
    """What a run of ``config`` would compute, stage by stage, and why; with an ``export:`` section, also what
    ``transferpipe export`` would write; with ``index:``, the index ``transferpipe index`` would build; with a
    ``select:`` section, what ``transferpipe select`` would compute for each candidate."""
    steps = walk(config, also=side_goals(config))
    if config.select is not None:
        steps += [step for _, candidate in candidates(config) for step in walk(candidate, "score")]
    return steps


def render(items: list[Step]) -> list[str]:
    """One line per item: stage, what, cached or compute, key, and the reasons below it."""
    lines = []
    for item in items:
        if item.stage == "note":
            lines += [f"note      {why}" for why in item.why]
            continue
        state = "cached " if item.cached else "compute"
        key = short(item.key) if item.key else "-"
        lines.append(f"{item.stage:<9} {item.what:<32} {state}  {key}")
        lines += [f"{'':<9}   why: {why}" for why in item.why]
    return lines
