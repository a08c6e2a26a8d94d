"""Export: a split's cached features as Parquet or NumPy files for other tools (polars, DuckDB, pandas).

Owns: the ``export:`` config, plan and stage (``stage``), checked copies out of the cache.
May import: ``storage`` and the shared ``tasks`` modules; no other stage package.
"""
