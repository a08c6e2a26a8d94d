"""``transferpipe watch``: new data in, a Prefect event out, and a served deployment that runs on it.

The watcher polls what a config's ``data:`` reads (the image folder, the shards' folders, a table's files)
every ``every`` seconds, comparing each file's size and modification time. A change is announced once the
data has been quiet for ``quiet`` seconds, so a burst of new shards is one event, not one per file: a
Prefect event ``transferpipe.data.changed`` on the resource ``transferpipe.dataset.<experiment>`` whose
payload says what was added, removed and changed. ``transferpipe serve CONFIG --on-data-change`` puts a
``DeploymentEventTrigger`` for that event on the deployment, so each announcement starts one run, which
extracts only the new pieces and refits and re-evaluates what depends on them (cache hits elsewhere).
"""
from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flows.config import ExperimentConfig

log = logging.getLogger("transferpipe.watch")

EVENT = "transferpipe.data.changed"
LISTED = 20  # file names an event lists per kind of change (the counts are always whole)

Snapshot = dict[str, tuple[int, int]]  # path -> (size, mtime in ns)


def resource_id(experiment: str) -> str:
    return f"transferpipe.dataset.{experiment}"


def watched(cfg: ExperimentConfig) -> list[Path]:
    """The folders and files a config's data reads: ``root``, the folders of its shards, its table files."""
    data, out = cfg.data, []
    if data.root is not None:
        out.append(Path(data.root).expanduser())
    if data.shards is not None:
        groups = [[g] if isinstance(g, str) else g for g in data.shard_patterns().values()]
        out += sorted({Path(p).expanduser().parent for group in groups for p in group})
    if data.path is not None:
        out += sorted({Path(p).parent for p in glob.glob(os.path.expanduser(data.path))} or
                      {Path(os.path.expanduser(data.path)).parent})
    return out


def snapshot(paths: list[Path]) -> Snapshot:
    """Every file under ``paths`` (hidden names and ``.tmp`` files left out: writers in progress)."""
    found: Snapshot = {}
    for root in paths:
        for path in _files(root):
            try:
                st = path.stat()
            except OSError:  # removed between listing and stat
                continue
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def _files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and not name.endswith(".tmp"):
                yield Path(folder) / name


def changes(before: Snapshot, after: Snapshot) -> dict[str, list[str]]:
    return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(p for p in after.keys() & before.keys() if after[p] != before[p])}


def payload(cfg: ExperimentConfig, found: dict[str, list[str]]) -> dict[str, Any]:
    return {"experiment": cfg.name, "source": cfg.data.source,
            **{f"{kind}_count": len(paths) for kind, paths in found.items()},
            **{kind: paths[:LISTED] for kind, paths in found.items()}}


def watch(cfg: ExperimentConfig, every: float, quiet: float, announce: Callable[[dict[str, Any]], None],
          polls: int | None = None, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll and announce each quiet change; returns how many were announced (``polls``: stop after that many
    polls, for tests and ``--once``-style use; None: until interrupted)."""
    paths = watched(cfg)
    baseline = last = snapshot(paths)
    moved_at, announced, n = clock(), 0, 0
    log.info("watching %s for %s (every %gs, quiet %gs)", ", ".join(map(str, paths)), cfg.name, every, quiet)
    while polls is None or n < polls:
        sleep(every)
        n += 1
        now = snapshot(paths)
        if now != last:  # still moving: wait until it has been quiet
            last, moved_at = now, clock()
        elif now != baseline and clock() - moved_at >= quiet:
            announce(payload(cfg, changes(baseline, now)))
            announced, baseline = announced + 1, now
    return announced


def emit(cfg: ExperimentConfig) -> Callable[[dict[str, Any]], None]:
    """Announce on the Prefect server: one ``transferpipe.data.changed`` event."""
    from prefect.events import emit_event

    def announce(body: dict[str, Any]) -> None:
        emit_event(event=EVENT, resource={"prefect.resource.id": resource_id(cfg.name),
                                          "prefect.resource.name": cfg.name}, payload=body)
        log.info("%s: %d added, %d removed, %d changed: event %s sent", cfg.name, body["added_count"],
                 body["removed_count"], body["changed_count"], EVENT)

    return announce


def trigger(cfg: ExperimentConfig) -> Any:
    """The served deployment's trigger: a run for each announcement about this experiment's data."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(name=f"{cfg.name} data changed", expect={EVENT},
                                  match={"prefect.resource.id": resource_id(cfg.name)})
