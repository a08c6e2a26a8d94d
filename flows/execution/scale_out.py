"""Extraction sharded over Dask workers with Prefect's Dask task runner (prefect-dask).

The pieces of each split that are not stored yet (:mod:`tasks.extract.pieces`: a
WebDataset shard, or a content-defined run of images) are dealt to the workers
in groups of whole pieces; every group is a cached, retryable task that a
worker extracts to the pieces' own files (``features/pieces/``), one GPU per
task where ``gpus_per_worker`` asks for it (a Dask resource). The flow then
joins each split's pieces into the usual ``<key>.h5`` with HDF5 virtual
datasets (no copy), exactly as a single process does (the features can differ
from a two-thread process's in a float16's last bit: Dask workers run torch on
one thread).
"""
from __future__ import annotations

import contextlib
import logging
import os

from prefect import flow

from flows.config import DaskConfig, ExperimentConfig
from flows.execution.local import experiment_run_name
from flows.execution.stage_tasks import TASKS, extract_pieces_task, join_pieces_task, run_stage, submit_stage
from tasks.extract.plan import ExtractResult, SplitPlan
from tasks.extract.plan import is_stored
from tasks.extract.groups import plan_groups

log = logging.getLogger("transferpipe.scale_out")


def task_runner(cfg: DaskConfig):
    """A DaskTaskRunner on an existing scheduler, or on a LocalCluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    cluster = {"n_workers": cfg.workers, "threads_per_worker": cfg.threads_per_worker, "processes": True,
               "dashboard_address": None}
    if cfg.gpus_per_worker:
        cluster["resources"] = {"GPU": cfg.gpus_per_worker}
    return DaskTaskRunner(cluster_kwargs=cluster)


def _shard_resources(cfg: DaskConfig):
    if not cfg.gpus_per_worker:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": cfg.gpus_per_worker})


@flow(name="extract-sharded", flow_run_name=experiment_run_name("extract-sharded"), validate_parameters=False)
def sharded_extract_flow(config: ExperimentConfig, plans: list[SplitPlan]) -> dict[str, ExtractResult]:
    """The missing pieces of every unstored split on the Dask workers, then one join per split here."""
    cfg = config.dask
    name = f"extract-{config.backbone.name}"
    todo = {p.split: plan_groups(p, cfg.shards or cfg.workers) for p in plans if not is_stored(p)}
    with _shard_resources(cfg):
        futures = {
            split: [submit_stage(extract_pieces_task, g, config, stored=False,
                                 name=f"{name}-{split}-pieces{g.index + 1}of{g.count}") for g in groups]
            for split, groups in todo.items()
        }
    results = {}
    for plan in plans:
        if plan.split not in todo:
            results[plan.split] = run_stage(TASKS["extract"], plan, config, stored=True, name=f"{name}-{plan.split}")
            continue
        groups = [future.result() for future in futures[plan.split]]
        joined = run_stage(join_pieces_task, plan, config, stored=False, name=f"join-{config.backbone.name}-{plan.split}")
        results[plan.split] = joined.model_copy(update={
            "forward_batches": sum(g.forward_batches for g in groups),
            "seconds": joined.seconds + sum(g.seconds for g in groups),
            "cache_hit": all(g.cache_hit for g in groups),
        })
    return results


def sharded_extract(config: ExperimentConfig, plans: list[SplitPlan]) -> dict[str, ExtractResult]:
    """Run :func:`sharded_extract_flow` on the Dask task runner the config's ``dask:`` section describes."""
    if not os.environ.get("PREFECT_API_URL"):
        log.warning("dask: no PREFECT_API_URL, so every Dask worker starts its own ephemeral Prefect server "
                    "(~10-20 s each); start `prefect server start` and set PREFECT_API_URL")
    import dask
    import distributed  # noqa: F401 - load its config defaults first: a set() before would drop them

    # non-daemonic LocalCluster workers, so each can run DataLoader decode workers of its own
    environ = dict(os.environ)
    try:
        with dask.config.set({"distributed.worker.daemon": False}):
            return sharded_extract_flow.with_options(task_runner=task_runner(config.dask))(config, plans)
    finally:  # a LocalCluster sets OMP_NUM_THREADS=1 (and more) in this process too: later children would inherit it
        os.environ.clear()
        os.environ.update(environ)
