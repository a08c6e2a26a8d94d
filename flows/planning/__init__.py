"""The experiment graph: which declared stages a run executes and how each is planned (graph.py, nodes.py),
what the later stages need checked before anything computes (checks.py), and ``transferpipe plan``
(explain.py). Nothing here runs a stage's work: flows/execution/ does."""
