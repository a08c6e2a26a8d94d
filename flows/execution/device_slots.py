"""One job per GPU: extraction and fine-tuning on CUDA hold a slot of a Prefect global concurrency limit
named after the device, ``gpu-<host>-<index>`` (limit 1, created on first use), for as long as they compute.

Concurrent runs, sweeps and served deployments that talk to one Prefect server then take turns on each GPU,
whatever process they run in; stages on the CPU never wait. The slot is leased (Prefect renews the lease
while the stage runs), so a run killed with ``kill -9`` frees it when the lease runs out (``$``:data:`LEASE_ENV`
seconds, default 300, at least 60, plus up to 15 s for the server's repossessor). A stage whose output is stored returns
without taking a slot.

The limit lives on the server: without one (Prefect's ephemeral mode, each command its own server) there is
no one to share the GPU with through it, so no slot is taken (said once in the log). ``$``:data:`GUARD_ENV`
``=1`` guards the CPU as if it were one GPU (``cpu-<host>``): how the tests check the guard on a machine
without CUDA.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("transferpipe.slots")

GUARD_ENV = "TRANSFERPIPE_GUARD_CPU"
LEASE_ENV = "TRANSFERPIPE_SLOT_LEASE_S"
DEFAULT_LEASE_S = 300.0
MIN_LEASE_S = 60.0  # the shortest lease the Prefect server accepts


def host() -> str:
    """This machine's name as a limit name takes it (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-") or "host"


def slot_name(device: str) -> str | None:
    """The limit a stage on ``device`` (a config's ``auto``, ``cuda:1``, ...) takes a slot of, or None."""
    from tasks.machine import pick_device

    picked = pick_device(device)
    if picked.type == "cuda":
        import torch

        return f"gpu-{host()}-{picked.index if picked.index is not None else torch.cuda.current_device()}"
    if picked.type == "cpu" and os.environ.get(GUARD_ENV) == "1":
        return f"cpu-{host()}"
    return None


def _on_a_server() -> bool:
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@functools.lru_cache(maxsize=None)
def _ensure_limit(name: str) -> None:
    """The limit with one slot, created when missing (an existing one keeps the limit its owner set)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass


@contextmanager
def device_slot(device: str, what: str) -> Iterator[str | None]:
    """Hold the device's slot around a stage's computation; yields the limit's name (None: not guarded)."""
    name = slot_name(device)
    if name is None:
        yield None
        return
    lease = float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))
    if lease < MIN_LEASE_S:
        raise ValueError(f"${LEASE_ENV}={lease:g}: Prefect's concurrency leases last at least {MIN_LEASE_S:g} s")
    if not _on_a_server():
        _say_unguarded(name)
        yield None
        return
    from prefect.concurrency.sync import concurrency

    _ensure_limit(name)
    asked = time.monotonic()
    with concurrency(name, occupy=1, lease_duration=lease, strict=True):
        log.info("%s: took %s (waited %.1f s)", what, name, time.monotonic() - asked)
        try:
            yield name
        finally:
            log.info("%s: releases %s", what, name)


@functools.lru_cache(maxsize=None)
def _say_unguarded(name: str) -> None:
    log.info("no Prefect server: %s is not shared through a concurrency limit (start one: transferpipe server "
             "start)", name)


def guarded(stage: Callable[[Any], Any], device: Callable[[Any], str], stored: Callable[[Any], bool],
            what: str) -> Callable[[Any], Any]:
    """``stage`` holding its device's slot while it computes; a plan whose output is stored skips the slot."""
    @functools.wraps(stage)
    def run(plan: Any) -> Any:
        if stored(plan):
            return stage(plan)
        with device_slot(device(plan), what):
            return stage(plan)

    return run
