"""Backbones: where networks come from, which weights, which layers, how to preprocess, and the torch models.

Owns: the ``backbone:`` config and its resolution into a :class:`~tasks.backbones.config.BackboneSpec`
(``config``, no torch), the backbone sources (``source`` is the contract, ``hub`` torchvision and timm,
``factory`` the user's ``module:factory``, ``sources`` the registry: the one list a new source is added to),
and the torch side (``models``: build a feature extractor, load a classifier).
May import: ``storage`` and the shared ``tasks`` modules; no other stage package.
"""
from tasks.backbones.config import BackboneConfig, BackboneSpec, resolve

__all__ = ["BackboneConfig", "BackboneSpec", "resolve"]
