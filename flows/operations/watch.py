"""``transferpipe watch``: new data in, a Prefect event out, and a served deployment that runs on it.

The watcher polls what a config's ``data:`` reads (the image folder, the shards' folders, a table's files)
every ``every`` seconds, comparing each file's size and modification time. A change is announced once the
data has been quiet for ``quiet`` seconds, so a burst of new shards is one event, not one per file: a
Prefect event ``transferpipe.data.changed`` on the resource ``transferpipe.dataset.<experiment>.<data id>`` whose
payload says what was added, removed and changed. ``transferpipe serve CONFIG --on-data-change`` puts a
``DeploymentEventTrigger`` for that event on the deployment, so each announcement starts one run, which
extracts only the new pieces and refits and re-evaluates what depends on them (cache hits elsewhere).

At least once, never silently lost: the baseline (what was last announced) is kept in the cache
(``<cache>/watch/<experiment>.json``) and advances only after the server has the event (read back by its
id), so a change made while no watcher ran, pending when one was killed, or announced while the server was
down is announced by the next poll or the next watcher. A file that never settles is announced after
``max_wait`` seconds anyway. File names that are not UTF-8 are sent escaped (``\\xff``), not dropped.
"""
from __future__ import annotations

import glob
import json
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


def resource_id(cfg: ExperimentConfig) -> str:
    """The event's resource: the experiment's name and what identifies its data (the ``data:`` section and the
    cache folder), so two configs that share a name never trigger each other's deployments."""
    from storage.keys import dataset_resource

    return dataset_resource(cfg.name, cfg.data.model_dump(mode="json"), cfg.cache_dir)


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
            **{kind: [printable(p) for p in paths[:LISTED]] for kind, paths in found.items()}}


def printable(path: str) -> str:
    """A path as UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by Python) as ``\\xff`` escapes, where
    JSON (and so a Prefect event) would otherwise fail on them and the event be dropped."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class NotAnnounced(RuntimeError):
    """The server did not take the event: the baseline stays, and the change is announced again."""


def load_baseline(state: Path) -> Snapshot | None:
    """What was last announced (None: nothing yet, or a state file that cannot be read: it starts afresh)."""
    try:
        files = json.loads(state.read_text())["files"]
        return {path: (int(size), int(mtime)) for path, (size, mtime) in files.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_baseline(state: Path, files: Snapshot) -> None:
    from storage import atomic

    state.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(state, {"files": files})


def watch(cfg: ExperimentConfig, every: float, quiet: float, announce: Callable[[dict[str, Any]], None],
          polls: int | None = None, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep, max_wait: float = 300.0, state: Path | None = None) -> int:
    """Poll and announce each quiet change; returns how many were announced (``polls``: stop after that many
    polls, for tests and ``--once``-style use; None: until interrupted).

    ``state``: where the baseline is kept (the cache's ``watch/<experiment>.json`` from the CLI; None: in
    memory only). ``announce`` raising :class:`NotAnnounced` keeps the baseline: the change is announced again
    at the next poll. A change still moving after ``max_wait`` seconds is announced as it stands."""
    paths = watched(cfg)
    last = snapshot(paths)
    baseline = (load_baseline(state) if state else None)
    if baseline is None:
        baseline = last
        if state:
            save_baseline(state, baseline)
    elif baseline != last:
        log.info("%s: the data changed since the last announcement (%s): announcing once quiet", cfg.name, state)
    moved_at = pending_since = clock()
    announced, n, gone = 0, 0, set()
    log.info("watching %s for %s (every %gs, quiet %gs, at most %gs)", ", ".join(map(str, paths)), cfg.name,
             every, quiet, max_wait)
    while polls is None or n < polls:
        sleep(every)
        n += 1
        gone = _say_vanished(paths, gone)
        now = snapshot(paths)
        if now != last:  # still moving: wait until it has been quiet (or too long)
            last, moved_at = now, clock()
        if now == baseline:
            pending_since = clock()
            continue
        if clock() - moved_at >= quiet or clock() - pending_since >= max_wait:
            try:
                announce(payload(cfg, changes(baseline, now)))
            except NotAnnounced as exc:
                log.warning("%s: %s; the change is announced again at the next look", cfg.name, exc)
                continue
            announced, baseline, pending_since = announced + 1, now, clock()
            if state:
                save_baseline(state, baseline)
    return announced


def _say_vanished(paths: list[Path], gone: set[Path]) -> set[Path]:
    """Say when a watched folder disappears (its files then count as removed) and when it is back."""
    now_gone = {p for p in paths if not p.exists()}
    for path in sorted(now_gone - gone):
        log.warning("watched %s is gone (moved, deleted or unmounted): its files count as removed; watching for "
                    "it to come back", path)
    for path in sorted(gone - now_gone):
        log.info("watched %s is back", path)
    return now_gone


def emit(cfg: ExperimentConfig, api_url: str, confirm_s: float = 60.0) -> Callable[[dict[str, Any]], None]:
    """Announce on the Prefect server: one ``transferpipe.data.changed`` event, read back from the server by its
    id before it counts (Prefect's ``emit_event`` returns as if sent when the server is down or the payload
    cannot be serialised); :class:`NotAnnounced` when it is not there within ``confirm_s`` seconds."""
    import httpx
    from prefect.events import emit_event

    def announce(body: dict[str, Any]) -> None:
        event = emit_event(event=EVENT, resource={"prefect.resource.id": resource_id(cfg),
                                                  "prefect.resource.name": cfg.name}, payload=body)
        if event is None:
            raise NotAnnounced("Prefect emitted no event (events are off in this process)")
        deadline = time.monotonic() + confirm_s
        while time.monotonic() < deadline:
            try:
                found = httpx.post(f"{api_url}/events/filter", timeout=10,
                                   json={"filter": {"id": {"id": [str(event.id)]}}, "limit": 1}).json()
                if found.get("events"):
                    log.info("%s: %d added, %d removed, %d changed: event %s on the server", cfg.name,
                             body["added_count"], body["removed_count"], body["changed_count"], EVENT)
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1.0)
        raise NotAnnounced(f"the server at {api_url} has no event {event.id} after {confirm_s:g}s (is it running?)")

    return announce


def trigger(cfg: ExperimentConfig) -> Any:
    """The served deployment's trigger: a run for each announcement about this experiment's data."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(name=f"{cfg.name} data changed", expect={EVENT},
                                  match={"prefect.resource.id": resource_id(cfg)})
