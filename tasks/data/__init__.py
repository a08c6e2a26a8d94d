"""Datasets: the ``data:`` config, the dataset sources, manifests and splits, and the one decode path.

Owns: where images come from (:data:`SOURCES`, listed below: the one place a source is registered), the
manifest (ids, labels, splits, fingerprint), image decoding and header checks, and the bundled datasets.
May import: ``storage`` and the shared ``tasks`` modules; no other stage package (every stage reads data).

Modules: ``config`` (the section, the source contract, the registry), ``errors``, ``labels``, ``manifest``,
``images``, ``folder`` / ``webdataset`` / ``table`` (the sources), ``synthetic`` (bundled datasets),
``tar_index`` and ``arrow`` (the readers under the webdataset and table sources).
"""
from tasks.data.config import SOURCES, DataConfig
from tasks.data.errors import BadImageError, DataError
from tasks.data.folder import Csv, Digits, Files, ImageFolder, Mnist5k
from tasks.data.images import read_image
from tasks.data.manifest import Manifest, build_manifest
from tasks.data.table import Table
from tasks.data.webdataset import WebDataset

# The registry, in the order error messages list the names. Adding a source: a DataSource subclass in its
# own module, listed here.
SOURCES.update((source.name, source) for source in (Digits(), Mnist5k(), ImageFolder(), Files(), Csv(), WebDataset(),
                                                                   Table()))

__all__ = ["SOURCES", "BadImageError", "DataConfig", "DataError", "Manifest", "build_manifest", "read_image"]
