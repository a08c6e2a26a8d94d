"""Stages: plain functions over paths and a typed stage config, one subpackage per stage and registry.

Packages (each ``__init__`` says what it owns) and what each may import besides ``storage`` and the shared
modules here (``machine``: devices, precision, the memory budget, versions; ``result``: the stage result base; ``softmax``;
``zoo``: backbone factories that ship with transferpipe)::

    data        -                                    datasets, sources, manifests, decoding
    backbones   -                                    backbone configs, sources, torch models
    heads       -                                    head configs, estimators, the heads stage
    index       -                                    exact retrieval, the FAISS index stage
    export      -                                    features out as Parquet / NumPy
    extract     data, backbones                      the frozen forward pass into HDF5
    finetune    data, backbones, heads               LP-FT, checkpointed
    select      backbones, heads                     transferability scores, backbone ranking
    evaluate    data, backbones, heads, index        metrics, intervals, report, plots
    quality     data, index                          near-duplicates, leaks, label issues, outliers

``tests/test_architecture.py`` holds the same table and fails on an import it does not allow, on any
import circle (``TYPE_CHECKING`` imports included), on a module over 400 lines and a function over 60.
The shared modules import no stage package.
"""
