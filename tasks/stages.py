"""Every stage of the experiment graph, in the order a run executes them: the one list flows/ derives the
config sections, the graph's goals, the Prefect tasks, the pipeline's results, ``plan``'s lines and the plain
commands from. Adding a stage: its package (a ``plan.py`` declaring ``STAGE``, see tasks/declare.py), one
line here, its key in storage/keys.py and its files class in storage/records.py (docs/DEVELOPING.md).
"""
from __future__ import annotations

from tasks.declare import Stage
from tasks.evaluate.plan import STAGE as EVALUATE
from tasks.export.plan import STAGE as EXPORT
from tasks.extract.plan import STAGE as EXTRACT
from tasks.finetune.plan import STAGE as FINETUNE
from tasks.heads.plan import STAGE as HEADS
from tasks.index.plan import STAGE as INDEX
from tasks.model_export.plan import STAGE as EXPORT_MODEL
from tasks.predict.plan import STAGE as PREDICT
from tasks.quality.plan import STAGE as QUALITY
from tasks.select.plan import STAGE as SCORE

STAGES: tuple[Stage, ...] = (EXTRACT, QUALITY, HEADS, FINETUNE, EVALUATE, PREDICT, EXPORT_MODEL, SCORE, EXPORT,
                                 INDEX)

#: by name
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
