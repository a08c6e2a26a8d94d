"""Documented fault injection for tests and drills: ``TRANSFERPIPE_FAULTS``.

Comma-separated ``point:n[:action]`` entries. At the n-th time (1-based) the
code passes ``point``, the process dies on the spot (``kill``: SIGKILL, as a
crash or OOM kill would), raises ``InjectedFault`` (``raise``, the default), or
sleeps (``delay=SECONDS``, to hold a lock in concurrency tests). Counting
starts afresh whenever the variable changes. Unset, :func:`fault_point` costs
one dictionary lookup.

Points: ``extract.batch`` (after a batch is computed, before it is written),
``store.append`` (features written, ``rows_done`` not yet), ``store.complete``
(labels, paths and checksums written, ``complete`` not yet, no rename),
``finetune.batch`` (after an optimiser step), ``finetune.epoch`` (after the
epoch's checkpoint is written).
"""
from __future__ import annotations

import os
import signal
import time

ENV = "TRANSFERPIPE_FAULTS"
_seen: dict[str, int] = {}  # passes per point, counted afresh whenever the variable changes
_seen_for = ""


class InjectedFault(RuntimeError):
    """A failure asked for through TRANSFERPIPE_FAULTS."""


def _plan() -> dict[str, tuple[int, str]]:
    plan = {}
    for entry in filter(None, os.environ.get(ENV, "").split(",")):
        point, n, *action = entry.strip().split(":")
        plan[point] = (int(n), action[0] if action else "raise")
    return plan


def fault_point(point: str) -> None:
    global _seen_for
    spec = os.environ.get(ENV, "")
    if spec != _seen_for:
        _seen.clear()
        _seen_for = spec
    if not spec:
        return
    wanted = _plan().get(point)
    if wanted is None:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != wanted[0]:
        return
    action = wanted[1]
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("delay="):
        time.sleep(float(action.removeprefix("delay=")))
        return
    raise InjectedFault(f"injected fault at {point} (pass {wanted[0]}, {ENV})")
