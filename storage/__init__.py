"""Everything on disk: cache layout and keys, the HDF5 feature store, artifacts, results.

Knows nothing of torch models or Prefect (docs/ARCHITECTURE.md, "Layers").
"""
