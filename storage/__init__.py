"""Everything on disk: cache keys, the HDF5 feature store, artifacts, results.

Knows nothing of torch models or Prefect (see DESIGN.md, "Layers").
"""
