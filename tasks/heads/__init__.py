"""Heads: the ``heads:`` entries, their estimators, and the stage that trains them on cached features.

Owns: the head configs (``configs``: one schema per kind, :data:`~tasks.heads.configs.CONFIGS`), the
estimators (``grid``: the shared life cycle, ``linear``, ``neighbours``; ``estimators``: the registry by
kind, the one list a new head is added to), and the stage (``stage``: plans, few-shot subsets, fits,
saving and loading heads as arrays + JSON, never pickles).
May import: ``storage`` and the shared ``tasks`` modules; no other stage package (heads read features, not
images or networks).
"""
from tasks.heads.stage import load_head, load_split

__all__ = ["load_head", "load_split"]
