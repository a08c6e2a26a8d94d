"""A split's features in pieces: a dataset that grows extracts only what is new.

A split's rows are cut into pieces, each extracted to its own file under
``features/pieces/`` and keyed by its own items (ids and identities) and the
backbone spec, never by the rest of the split; the split's feature file joins
them without copying (:mod:`storage.piece_join`). So when a dataset grows or a
file changes, only the pieces holding new or changed items compute.

Where the cuts go: a WebDataset sample's piece is its shard (a new shard is a
new piece). For the other sources the cuts are content-defined over the
split's sorted ids: a piece ends after an id whose hash is 0 modulo
``extract.piece_size`` (pieces of that many images on average), so an inserted
or changed file touches its own piece only and never shifts the cuts of the
others. Dask workers are dealt whole pieces (:mod:`tasks.extract.groups`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from storage.keys import piece_key
from tasks.data.config import get as data_source
from tasks.data.manifest import Manifest


class Piece(BaseModel):
    """Rows ``[start, stop)`` of a split, stored as ``features/pieces/<key>.h5``."""

    model_config = ConfigDict(frozen=True)

    key: str
    start: int
    stop: int
    name: str  # for people: "shard train-000100.tar", or "piece 17 (cat/0412.png … cat/1500.png)"

    @property
    def rows(self) -> int:
        return self.stop - self.start


def cuts(ids: list[str], group: Callable[[str], str | None], mean: int) -> list[tuple[int, int]]:
    """``[start, stop)`` spans over ``ids`` (sorted): one per group (a shard) where ``group`` gives one; else a
    span ends after an id whose hash is 0 modulo ``mean`` (content-defined: an inserted id never moves another
    span's bounds)."""
    spans, start = [], 0
    groups = [group(item) for item in ids]
    for i, item in enumerate(ids):
        if i + 1 == len(ids) or groups[i + 1] != groups[i] or (groups[i] is None and _hash(item) % mean == 0):
            spans.append((start, i + 1))
            start = i + 1
    return spans


def _hash(item: str) -> int:
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big")


def plan_pieces(manifest: Manifest, split: str, spec: dict, mean: int) -> tuple[Piece, ...]:
    """The pieces of ``split`` in row order, each with its key (cheap: ids and identities only)."""
    source = data_source(manifest.source)
    items, files = manifest.splits[split], manifest.files.get(split) or [None] * len(manifest.splits[split])
    ids = [p for p, _ in items]
    pieces = []
    for n, (start, stop) in enumerate(cuts(ids, source.piece_of, mean)):
        key = piece_key(spec, ids[start:stop], files[start:stop], manifest.source, manifest.options)
        shard = source.piece_of(ids[start])
        name = f"shard {shard}" if shard is not None else (
            f"piece {n + 1} ({ids[start]})" if stop - start == 1 else f"piece {n + 1} ({ids[start]} … {ids[stop - 1]})")
        pieces.append(Piece(key=key, start=start, stop=stop, name=name))
    return tuple(pieces)
