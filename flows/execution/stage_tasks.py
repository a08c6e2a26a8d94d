"""Every stage as a Prefect task, in one place: retries, content cache keys, trust in the store.

Every stage task gets the same treatment:

* its Prefect cache key is ``<task name>-<content key>-<cache folder>`` (namespaced: a bare
  ``INPUTS`` policy lets two tasks with equal inputs return each other's results; and the
  cache folder's path, so one cache never receives another's result);
* results are persisted as JSON and stay small (paths, keys, metrics); records are read only through
  :class:`flows.execution.trusted_records.StageRecords`, so one not in transferpipe's own shape (pickle, another
  serializer, a ``__class__`` to import) is a miss, never code run;
* when the store does not hold the stage's output, ``refresh_cache`` forces a
  recompute, so a Prefect cache hit never points at a deleted or corrupt file;
* a cached stage's result (what ``run`` prints) comes from its store, never from Prefect's record;
* retries back off exponentially and are not spent on bad input (``ValueError``).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from flows.config import ExperimentConfig
from flows.execution.device_slots import guarded
from flows.execution.trusted_records import StageRecords
from storage import keys
from storage.layout import CacheLayout
from tasks.declare import Stage
from tasks.extract.groups import extract_group, join_group, worker_device
from tasks.stages import STAGES

def content_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The stage's own key, namespaced by task name and cache folder; every stage takes one plan, with a ``key``.

    The folder is part of it because a result names files in its cache: two caches side by side, or one
    moved or copied, each get their own Prefect record (the stage then reuses what its own store holds).
    """
    (plan,) = parameters.values()
    cache_dir = getattr(plan, "cache_dir", None) or plan.split.cache_dir  # a piece group's plan holds its split's
    return keys.prefect_cache_key(context.task.name, plan.key, cache_dir)


def retry_unless_bad_input(task: Task, task_run: Any, state: Any) -> bool:
    """Retry crashes and I/O errors; a ValueError (bad config or data) fails at once."""
    try:
        state.result()
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


STAGE_TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": content_cache_key,
    "persist_result": True,
    "result_serializer": "json",
    "retry_condition_fn": retry_unless_bad_input,
}


def stage_task(name: str, stage: Callable[[Any], Any]) -> Task:
    """A stage function (one plan in, one small result out) as a Prefect task with the options above."""
    return task(stage, name=name, **STAGE_TASK_OPTIONS)


def declared_task(stage: Stage) -> Task:
    """A declared stage's Prefect task: its run function (``module:function``) under its task name; a stage with
    a device holds that GPU's slot while it computes (flows/execution/device_slots.py: one job per GPU across runs)."""
    module, _, name = stage.run.partition(":")
    fn = getattr(importlib.import_module(module), name)
    if stage.device is not None:
        fn = guarded(fn, stage.device, stage.stored, stage.name)
    return stage_task(stage.task, fn)


#: every declared stage's task, by stage name
TASKS: dict[str, Task] = {stage.name: declared_task(stage) for stage in STAGES}
# a split's pieces on Dask workers (flows/execution/scale_out.py): the extraction's own scale-out tasks
extract_pieces_task = stage_task("extract-pieces", guarded(
    extract_group, lambda g: worker_device(g.split).extract.device, lambda g: False, "extract pieces"))
join_pieces_task = stage_task("join-pieces", join_group)


def _configured(task: Task, config: ExperimentConfig, *, stored: bool, name: str) -> Task:
    """The task with this run's name, the config's retries, a forced recompute when the store lacks its output,
    and its result record kept in the cache folder (:func:`records_storage`)."""
    retries, delay = config.retries, config.retry_delay_s
    delays = exponential_backoff(backoff_factor=delay)(retries) if retries and delay else 0
    return task.with_options(task_run_name=name, retries=retries, retry_delay_seconds=delays, refresh_cache=not stored,
                             result_storage=records_storage(config.cache_dir))


def records_storage(cache_dir: Path) -> Any:
    """Prefect's result storage for the stages of one cache: ``<cache>/prefect-records/``, not
    ``$PREFECT_HOME/storage``, so a hit recorded by one machine or Prefect home (a Dask worker elsewhere, a
    served deployment, a laptop) is seen by every other that shares the cache folder. A ``StageRecords``
    block (records checked before Prefect reads them) named ``transferpipe-records-<hash of the folder>``, saved on the server in use (Prefect resolves
    result storage there), once per process, server and home."""
    from prefect.settings import get_current_settings

    folder = str(Path(cache_dir).expanduser().resolve())
    settings = get_current_settings()
    return _saved_storage(folder, str(settings.api.url), str(settings.home))


@functools.lru_cache(maxsize=32)
def _saved_storage(folder: str, api: str, home: str) -> Any:
    block = StageRecords(basepath=str(CacheLayout(folder).prefect_records()))
    block.save(keys.records_block_name(folder), overwrite=True)
    return block


class StageFailed(RuntimeError):
    """A stage's task failed (after its retries); the message names the stage (also ``stage``), ``__cause__`` is
    the error."""

    def __init__(self, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class StageInputError(StageFailed, ValueError):
    """A stage failed on bad input (config or data): not retried, exit code 2 at the CLI."""


def stage_result(state: Any, name: str, task: Task, plan: Any) -> Any:
    """The stage's result from its final state; a failure is raised as StageFailed naming the stage.

    A cache hit is answered by the stage itself, which reuses what its store holds (cheaply: every stage reads
    its finished output back), not by Prefect's record: the store is the source of truth, and a record is only
    a hint that anyone who can write to the cache folder could have edited.
    """
    try:
        return task.fn(plan).cached() if state.name == "Cached" else state.result()
    except Exception as exc:
        kind = StageInputError if isinstance(exc, ValueError) else StageFailed
        raise kind(f"stage {name} failed: {exc}", stage=name) from exc


def run_stage(task: Task, plan: Any, config: ExperimentConfig, *, stored: bool, name: str) -> Any:
    """Call a stage task on ``plan``. ``stored``: whether the store already holds its output."""
    return stage_result(_configured(task, config, stored=stored, name=name)(plan, return_state=True), name, task, plan)


class StageFuture:
    """A stage running concurrently: :meth:`result` waits and returns (or raises) like :func:`run_stage`."""

    def __init__(self, future: Any, name: str, task: Task, plan: Any) -> None:
        self.future, self.name, self.task, self.plan = future, name, task, plan

    def result(self) -> Any:
        self.future.wait()
        return stage_result(self.future.state, self.name, self.task, self.plan)


def submit_stage(task: Task, plan: Any, config: ExperimentConfig, *, stored: bool, name: str) -> StageFuture:
    """Like :func:`run_stage`, concurrently."""
    return StageFuture(_configured(task, config, stored=stored, name=name).submit(plan), name, task, plan)
