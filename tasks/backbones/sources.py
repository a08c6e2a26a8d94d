"""The backbone sources by ``backbone.source`` name: the one list a new source is added to.
"""
from __future__ import annotations

from tasks.backbones.factory import Python
from tasks.backbones.hub import Timm, Torchvision
from tasks.backbones.source import BackboneError, Source


def get(source: str, search_path: tuple[str, ...] = ()) -> Source:
    """The registered source; ``search_path``: folders searched first for a factory's module (the config's)."""
    try:
        return SOURCES[source].searching(tuple(search_path))
    except KeyError:
        raise BackboneError(f"unknown backbone source {source!r}; valid: {', '.join(SOURCES)}") from None


#: the backbone sources by ``backbone.source`` name: the one registry (config validation lists these)
SOURCES: dict[str, Source] = {source.name: source for source in (Torchvision(), Timm(), Python())}
