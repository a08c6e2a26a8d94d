"""Documented fault injection for tests and drills: ``TRANSFERPIPE_FAULTS``.

Comma-separated ``point:when[:action]`` entries. ``when`` is ``n``: at the
n-th time (1-based) the code passes ``point``; or ``p=P``: each pass with
probability ``P`` (random transient faults, seeded by
``TRANSFERPIPE_FAULTS_SEED``, default 0). Then the process dies on the spot
(``kill``: SIGKILL, as a crash or OOM kill would), raises ``InjectedFault``
(``raise``, the default), or sleeps (``delay=SECONDS``, to hold a lock in
concurrency tests). Counting starts afresh whenever the variable changes.
Unset, :func:`fault_point` costs one dictionary lookup.

Points: ``extract.batch`` (after a batch is computed, before it is written),
``store.append`` (features written, ``rows_done`` not yet), ``store.complete``
(labels, paths and checksums written, ``complete`` not yet, no rename),
``heads.fit`` (before each few-shot fit of a head), ``finetune.batch`` (after an
optimiser step), ``finetune.epoch`` (after the epoch's checkpoint is written), ``predict.block`` (after a
block of predictions is scored and kept as a part, before it joins the table).
"""
from __future__ import annotations

import os
import random
import signal
import time

ENV = "TRANSFERPIPE_FAULTS"
SEED_ENV = "TRANSFERPIPE_FAULTS_SEED"
_seen: dict[str, int] = {}  # passes per point, counted afresh whenever the variable changes
_seen_for = ""
_rng = random.Random(0)
fired: dict[str, int] = {}  # faults raised or delayed in this process, per point (tests read it)


class InjectedFault(RuntimeError):
    """A failure asked for through TRANSFERPIPE_FAULTS."""


def _plan() -> dict[str, tuple[str, str]]:
    plan = {}
    for entry in filter(None, os.environ.get(ENV, "").split(",")):
        point, when, action = [*entry.strip().split(":"), "", ""][:3]
        action = action or "raise"
        ok = (when.isdigit() or (when.startswith("p=") and _is_float(when[2:]))) and (
            action in ("raise", "kill") or (action.startswith("delay=") and _is_float(action[6:])))
        if not ok:
            raise ValueError(f"{ENV}: entry {entry!r} is not point:N[:action] or point:p=P[:action] "
                             "with action raise, kill or delay=SECONDS")
        plan[point] = (when, action)
    return plan


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fires(point: str, when: str) -> bool:
    if when.startswith("p="):
        return _rng.random() < float(when[2:])
    _seen[point] = _seen.get(point, 0) + 1
    return _seen[point] == int(when)


def fault_point(point: str) -> None:
    global _seen_for
    spec = os.environ.get(ENV, "")
    if spec != _seen_for:
        _seen.clear()
        _rng.seed(int(os.environ.get(SEED_ENV, "0")))
        _seen_for = spec
    if not spec:
        return
    wanted = _plan().get(point)
    if wanted is None or not _fires(point, wanted[0]):
        return
    action = wanted[1]
    fired[point] = fired.get(point, 0) + 1
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.startswith("delay="):
        time.sleep(float(action.removeprefix("delay=")))
        return
    raise InjectedFault(f"injected fault at {point} ({wanted[0]}, {ENV})")
