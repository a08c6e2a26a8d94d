"""Partial fine-tuning end to end: unfreeze chosen blocks, discriminative learning rates, LP-FT.

This module is the stage (reuse under a lock, then train); the plan is plan.py, the training loop.py.

The only stage that trains the backbone, so the one made resumable: a
checkpoint (model, optimiser, schedule, scaler, epoch, RNG, best so far,
history) is written atomically after every epoch to
``finetune/<key>/last.pt`` (:class:`storage.checkpoints.RunFiles`); a retried or rerun stage continues
from it, and with deterministic settings reaches the same weights as an
uninterrupted run (per-epoch seeded shuffles, per-sample seeded augmentation).
The best epoch (by the validation metric) is saved as ``best.pt`` in the
transferpipe checkpoint format, which another experiment can name as its
``backbone.weights``. ``result.json``, written last, marks a finished run.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from filelock import FileLock

from storage.checkpoints import RunFiles
from tasks.finetune.plan import EpochLog, FinetunePlan, FinetuneResult, run_files

log = logging.getLogger("transferpipe.finetune")


#: torch's RNG is global to a process, so fine-tunes in threads of one process (a sweep) take turns;
#: separate processes and machines run in parallel. A run's determinism is worth more than that overlap.
_ONE_AT_A_TIME = threading.Lock()


def finetune(plan: FinetunePlan) -> FinetuneResult:
    """Fine-tune (or resume, or reuse) the run for ``plan.key``; one writer per key (a lock that dies with it)."""
    started = time.perf_counter()
    files = run_files(plan)
    if not files.finished():
        files.folder.mkdir(parents=True, exist_ok=True)
        with _ONE_AT_A_TIME, FileLock(str(files.lock)):
            if not files.finished():  # the run we waited for may have finished it
                files.heal()
                files.write_spec(plan.spec)
                return _train(plan, files, started)
    saved = files.read_result()
    return FinetuneResult.model_validate({**saved, "best_checkpoint": files.best, "cache_hit": True, "seconds": 0.0,
                                          "epochs_run": 0})


def _train(plan: FinetunePlan, files: RunFiles, started: float) -> FinetuneResult:
    """Train (torch is imported here, not when the stage is), then write ``result.json`` last: it marks the run done."""
    from tasks.finetune.loop import train

    done = train(plan, files)
    history = [EpochLog(**h) for h in done.state["history"]]
    best_epoch = done.state["best_epoch"]
    result = FinetuneResult(
        key=plan.key, best_checkpoint=files.best, best_epoch=best_epoch,
        best_val_accuracy=next(h.val_accuracy for h in history if h.epoch == best_epoch),
        epochs_run=sum(1 for h in history if h.epoch > done.resumed_from), resumed_from=done.resumed_from,
        history=history,
        train_seconds=sum(h.seconds for h in history), trainable_params=done.trainable_params,
        frozen_params=done.frozen_params, cache_hit=False, seconds=time.perf_counter() - started,
    )
    # the checkpoint relative to the run's folder: the cache can move (read back as files.best)
    files.write_result(result.model_copy(update={"best_checkpoint": Path(files.best.name)})
                       .model_dump_json(exclude={"cache_hit", "seconds"}))
    return result
