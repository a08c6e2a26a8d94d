"""Extraction: the frozen backbone over each split, once, into HDF5 feature files cut in pieces.

Owns: the ``extract:`` config and the plan (``plan``: per split, the key and its pieces), the pieces
(``pieces``: content-defined cuts, one file each), the stage (``stage``: reuse, compute what is missing,
join), the batched forward loop (``loop``: torch, imported only when something computes), Dask groups
(``groups``) and the GPU JPEG decode path benchmarks measure (``gpu_decode``).
May import: ``tasks.data``, ``tasks.backbones``, ``storage`` and the shared ``tasks`` modules.
"""
from tasks.extract.plan import ExtractConfig, SplitPlan, plan_extraction
from tasks.extract.stage import extract_split

__all__ = ["ExtractConfig", "SplitPlan", "extract_split", "plan_extraction"]
