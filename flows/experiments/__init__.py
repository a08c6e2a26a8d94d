"""Flows made of pipeline runs: sweeps of experiments (sweep.py), the demo (demo.py) and backbone selection
(selection.py, the graph run up to the heads for every candidate)."""
