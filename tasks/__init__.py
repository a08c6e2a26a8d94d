"""Stages: plain functions over paths and a typed stage config, one subpackage per stage and registry.

Each stage package declares its stage once (``STAGE`` in its ``plan.py``: a :class:`tasks.declare.Stage`)
and ``tasks/stages.py`` lists them in run order; flows/ derives everything else from that list. Two packages
hold no stage: ``data`` (datasets, sources, manifests, decoding) and ``backbones`` (backbone configs, sources,
torch models); they import no other package. A stage package imports, besides ``storage`` and the shared
modules here (``declare``: the stage record; ``machine``: devices, precision, the memory budget, versions;
``result``: the stage result base; ``softmax``; ``zoo``: backbone factories that ship with transferpipe),
only the packages its declaration's ``imports`` names.

``tests/test_architecture.py`` derives its table from the declarations and fails on an import they do not
allow, on any import circle (``TYPE_CHECKING`` imports included), on a module over 400 lines and a function
over 60, and on a ``STAGE`` that ``tasks/stages.py`` does not list. The shared modules import no stage
package (``stages``, the list, excepted).
"""
