"""Partial fine-tuning end to end (LP-FT): unfreeze the last blocks, lower learning rates for the backbone,
start the classifier from the best linear probe, checkpoint after every epoch.

Owns: the ``finetune:`` config and plan (``plan``), the stage (``stage``: reuse under a lock, then train),
the model surgery (``surgery``) and the training loop (``loop``, torch, imported only when it trains).
May import: ``tasks.data``, ``tasks.backbones``, ``tasks.heads`` (the probe it starts from), ``storage``
and the shared ``tasks`` modules.
"""
from tasks.finetune.plan import FinetuneConfig, FinetuneResult
from tasks.finetune.stage import finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
