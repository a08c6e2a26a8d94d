"""The ``data:`` config section and the contract every dataset source implements.

:data:`SOURCES` is the one registry of where images come from (``data.source``); it is filled in
:mod:`tasks.data` (the package's ``__init__``), the one place a new source is listed. A source owns the
``data:`` fields only it reads (:attr:`DataSource.fields`) and checks them (:meth:`DataSource.check`), so
the config never branches on a source's name.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from storage.keys import file_identities
from tasks.data.errors import SPLITS, DataError


def resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths in a config file are relative to that file's folder."""
    if value is None:
        return None
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


class DigitsConfig(BaseModel):
    """Which digits, rendered how (``source: digits`` only).

    ``half`` splits the 1,797 images into two disjoint, class-balanced halves
    (the demo pretrains on one and transfers to the other). ``style: scanner2``
    renders them as a second scanner would: thicker strokes, blur, a tinted
    background and ink, sensor noise. Variants are written at 32 px.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    half: Literal["all", "first", "second"] = "all"
    style: Literal["clean", "scanner2"] = "clean"
    classes: list[int] | None = Field(None, description="only these digits (default all ten)")

    @field_validator("classes")
    @classmethod
    def _digits(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) < 2 or not set(v) <= set(range(10))):
            raise ValueError(f"classes must be two or more distinct digits 0-9, got {v}")
        return sorted(set(v)) if v is not None else None


Items = dict[str, list[tuple[str, int]]]  # split ("all" before splitting) -> sorted (item id, label)


class Scan(NamedTuple):
    """What a source found: its root, class names, items per split, and the items it left out with
    ``on_bad_image: skip`` (``{path: item id, error, split}``; split ``all`` when the fractions decide)."""

    root: Path
    classes: list[str]
    items: Items
    left_out: Sequence[dict[str, str]] = ()


class DataSource:
    """Where a dataset's images come from."""

    name = ""
    #: needs ``data.root`` (a folder or a file); bundled sources write their images into the cache instead
    needs_root = True
    #: its items have class labels (at least two classes); an unlabelled source (``files``) has one, ``unlabelled``
    labelled = True
    #: the ``data:`` fields only this source reads (set for another source, they are an error)
    fields: tuple[str, ...] = ()
    #: of those, the ones it cannot do without, each with how to set it
    required: dict[str, str] = {}

    def check(self, cfg: DataConfig) -> None:
        """Refuse settings this source cannot read (raise ``ValueError`` naming the field); the config calls it
        after its own checks."""
        if self.needs_root and cfg.root is None:
            raise ValueError(f"source {self.name!r} needs data.root")
        for name, how in self.required.items():
            if getattr(cfg, name) is None:
                raise ValueError(f"source {self.name} needs data.{name}{how}")

    def scan(self, cfg: DataConfig, cache_dir: Path) -> Scan:
        """Root, class names, items per split and what was left out; raises :class:`DataError` naming the file
        or folder."""
        raise NotImplementedError

    def options(self, cfg: DataConfig) -> dict[str, str]:
        """What :meth:`open` needs besides the root and the id (kept in the manifest, part of its fingerprint)."""
        return {}

    def identities(self, root: Path, items: list[tuple[str, int]], content: bool,
                   options: dict[str, str]) -> list[Any]:
        """Each item's identity for the keys: size and mtime of its file, or with ``content`` its sha256."""
        return file_identities(root, items, content)

    def open(self, root: Path, item: str, options: dict[str, str]) -> IO[bytes]:
        """One item's encoded bytes, as a binary file object."""
        return open(os.path.join(root, item), "rb")

    def locations(self, root: Path, items: list[str], options: dict[str, str]) -> list[str]:
        """Where each item is, for people and other tools (predictions' ``path`` column): its file under the
        root; a source whose items are not files says what they are inside (a shard's member, a table's row)."""
        return [os.path.join(root, item) for item in items]

    def piece_of(self, item: str) -> str | None:
        """The group an item's features are cached with when the source has one (a shard), else None: then
        content-defined cuts over the ids group them (:mod:`tasks.extract.pieces`)."""
        return None


class DataConfig(BaseModel):
    """``data:`` section of an experiment config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "digits"  # a name in SOURCES (listed in tasks/data/__init__.py)
    root: Path | None = Field(None, description="imagefolder: the folder; csv: the CSV file; table: the folder "
                                                "image paths are relative to (default: the table's)")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    fingerprint: Literal["stat", "content"] = "stat"
    digits: DigitsConfig = DigitsConfig()
    shards: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="webdataset: tar shards, a brace pattern or a list, or {train: …, val: …, test: …}; "
                          "relative to the config's folder")
    path: str | None = Field(None, description="table: a .parquet, .csv or .jsonl file, or a glob of them")
    image: str = Field("image", description="table: the column with image bytes, a {bytes, path} struct, or paths")
    label: str = Field("label", description="table: the column with integer labels or class names")
    split: str | None = Field(None, description="table: a column with train / val (validation) / test")
    paths: Literal["anywhere", "inside_root"] = Field(
        "anywhere", description="csv/table of paths: 'anywhere' reads every file a row names (absolute, or "
                                "relative with '..'); 'inside_root' leaves out (or fails on) a row whose file, links "
                                "resolved, is not under data.root")
    label_key: str = Field("cls", pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$",
                           description="webdataset: the member holding the label (cls, txt, or json.<field>)")

    _resolve_root = field_validator("root")(resolve_path)

    @field_validator("path")
    @classmethod
    def _resolve_table(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        return str(resolve_path(Path(v), info))

    @field_validator("shards")
    @classmethod
    def _resolve_shards(cls, v: Any, info: ValidationInfo) -> Any:
        """Relative patterns are relative to the config's folder; split names are checked."""
        if v is None:
            return None
        base = (info.context or {}).get("base_dir")

        def place(pattern: str) -> str:
            pattern = os.path.expanduser(pattern)
            remote = "://" in pattern or pattern.startswith("pipe:")
            return pattern if remote or os.path.isabs(pattern) or base is None else os.path.join(base, pattern)

        def patterns(value: str | list[str]) -> list[str]:
            listed = [value] if isinstance(value, str) else list(value)
            if not listed:
                raise ValueError("data.shards: an empty list")
            return [place(p) for p in listed]

        if isinstance(v, dict):
            unknown = sorted(set(v) - set(SPLITS))
            if unknown or "train" not in v:
                raise ValueError(f"data.shards per split takes train (required), val, test; got {sorted(v)}")
            return {split: patterns(value) for split, value in v.items()}
        return patterns(v)

    def shard_patterns(self) -> dict[str, list[str]]:
        """``data.shards`` per split (``all`` when one pattern or list is split by the fractions)."""
        return dict(self.shards) if isinstance(self.shards, dict) else {"all": list(self.shards or [])}


    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v not in SOURCES:
            expected = [repr(name) for name in SOURCES]
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": f"{', '.join(expected[:-1])} or {expected[-1]}"})
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave images for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        source = SOURCES[self.source]
        source.check(self)
        for other in SOURCES.values():
            if other is not source and self._set(*(f for f in other.fields if f not in source.fields)):
                named = [f"data.{f}" for f in other.fields]
                listed = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
                raise ValueError(f"{listed} {'apply' if len(named) > 1 else 'applies'} to source: {other.name} only")
        return self

    def _set(self, *fields: str) -> bool:
        """Whether any of ``fields`` differs from its default."""
        return any(getattr(self, f) != type(self).model_fields[f].default for f in fields)


#: the dataset sources by ``data.source`` name, in the order error messages list them (filled in tasks/data/__init__.py)
SOURCES: dict[str, DataSource] = {}


def get(name: str) -> DataSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown data.source {name!r}; valid: {', '.join(SOURCES)}") from None
