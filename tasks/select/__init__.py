"""Backbone selection: rank candidate backbones for a dataset by transferability scores and by the probes
they end in.

Owns: the scores (``scores``: LogME, H-score, NCE, LEEP, Kendall's tau) and the ``select`` stage
(``stage``: config, per-candidate score plans, the ranking and its report).
May import: ``tasks.backbones``, ``tasks.heads`` (the features a head reads), ``storage`` and the shared
``tasks`` modules.
"""
