"""Evaluation: every trained model scored on the test split, with intervals, plots and a report.

Owns: the ``evaluate:`` config and plan (``plan``), the stage (``stage``), classification metrics
(``metrics``), bootstrap and paired intervals (``intervals``), the report and the registry rows
(``report``), its plots (``plots``) and the 2-D embedding map (``projection``).
May import: ``tasks.data``, ``tasks.backbones``, ``tasks.heads``, ``tasks.index`` (retrieval), ``storage``
and the shared ``tasks`` modules.
"""
