"""Retrieval and nearest-neighbour indexes over cached features.

Owns: exact blockwise retrieval and its metrics (``retrieval``: streamed over gallery chunks, never N x N),
and the ``index`` stage (``plan``: config, key, soundness check; ``stage``: build a FAISS index, tune it,
answer retrieval from it).
May import: ``storage`` and the shared ``tasks`` modules; no other stage package.
"""
