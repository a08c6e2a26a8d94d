"""The cache's small files, each kind through one class: every write atomic, every read forgiving.

| files | where (storage/layout.py) | class |
|---|---|---|
| one JSON record per key | ``manifests/``, ``backbones/``, ``metrics/``, ``scores/`` | :class:`Records` |
| a stage run's key spec and its result marker (written last) | ``finetune/<key>/``, ``runs/<experiment>/<key>/``, and each folder a subclass declares (``exports/``, ``quality/``, ``indexes/``, ``predictions/``) | :class:`StageFiles` |
| an evaluation's report, plots and marker | ``runs/<experiment>/<key>/`` | :class:`ReportFiles` |
| a selection's tables | ``select/<experiment>/`` | :class:`SelectionFiles` |

A record that cannot be read (damaged, half-written by an older version) reads
as absent, so the stage that owns it recomputes and the next write replaces it;
nothing else in the project spells these file names.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from storage.atomic import write_json, write_text
from storage.layout import CacheLayout

log = logging.getLogger("transferpipe.storage")


def set_aside(path: Path, folder: Path, why: str, tag: str | None = None) -> Path:
    """Move a damaged artifact into ``folder`` (never delete it), log why, and return where it went;
    ``tag`` (e.g. ``corrupt``) goes into the new name before the time."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = folder / f"{path.name}.{tag}-{stamp}" if tag else folder / f"{path.name}.{stamp}"
    os.replace(path, target)
    log.warning("%s: %s; moved to %s", path, why, target)
    return target


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Records:
    """One JSON file per key; ``path`` is the layout's method that names a key's file (``CacheLayout.scores``)."""

    path: Callable[[str], Path]

    def read(self, key: str) -> Any | None:
        return read_json(self.path(key))

    def write(self, key: str, value: Any) -> Path:
        return write_json(self.path(key), value)

    def values(self) -> Iterator[Any]:
        """Every readable record, in key order."""
        pattern = self.path("*")
        return (v for v in map(read_json, sorted(pattern.parent.glob(pattern.name))) if v is not None)


@dataclass(frozen=True)
class StageFiles:
    """A stage run's folder: ``spec.json`` (its key's fields, written when it starts) and ``result.json``
    (written last: the run is done).

    A subclass that owns a folder of the cache declares it, ``class PredictionFiles(StageFiles,
    folder="predictions", kind="predict")``: one folder per key under ``<cache>/<folder>/``, found by
    :data:`STAGE_FOLDERS` (``cache rm``, ``cache gc``, ``plan``'s reasons) instead of being listed by hand."""

    folder: Path

    #: the cache folder of a subclass's runs (``<cache>/<name>/<key>/``) and the stage kind it stores
    cache_folder: ClassVar[str | None] = None
    kind: ClassVar[str | None] = None

    def __init_subclass__(cls, folder: str | None = None, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if folder is not None:
            cls.cache_folder, cls.kind = folder, kind or folder
            STAGE_FOLDERS[cls.kind] = cls

    @classmethod
    def of(cls, cache_dir: str | Path, key: str) -> Any:
        """The files of one key's run of a subclass that declares its folder."""
        assert cls.cache_folder is not None, f"{cls.__name__} declares no cache folder"
        return cls(CacheLayout(cache_dir).stage_folder(cls.cache_folder) / key)

    @property
    def spec(self) -> Path:
        return self.folder / "spec.json"

    @property
    def result(self) -> Path:
        return self.folder / "result.json"

    def done(self) -> bool:
        return self.result.is_file()

    def write_spec(self, spec: dict[str, Any]) -> Path:
        return write_json(self.spec, spec)

    def write_result(self, text: str) -> Path:
        return write_text(self.result, text)

    def read_result(self) -> dict[str, Any] | None:
        return read_json(self.result)

    @contextmanager
    def staged(self, sound: Callable[[], bool] | None = None) -> Iterator[StageFiles]:
        """A temporary folder beside this one (``<name>.tmp-<pid>-<thread>``) to write a whole run into, its
        result last. When the block ends without error it is renamed into place, unless a sound run is already
        there (``sound``, default :meth:`done`: a concurrent writer finished first), which is kept; an unsound
        one is replaced. The temporary folder never outlives the block (``cache gc`` removes a killed one's)."""
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield type(self)(tmp)
            if not (sound or self.done)():
                shutil.rmtree(self.folder, ignore_errors=True)
                os.replace(tmp, self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: every stage files class that declares its cache folder, by the stage kind it stores
STAGE_FOLDERS: dict[str, type[StageFiles]] = {}


class ExportFiles(StageFiles, folder="exports", kind="export"):
    """An export's folder: each split as ``<split>.parquet``, with ``format: npy`` also ``<split>.npy``."""

    def table(self, split: str) -> Path:
        return self.folder / f"{split}.parquet"

    def array(self, split: str) -> Path:
        return self.folder / f"{split}.npy"


class QualityFiles(StageFiles, folder="quality"):
    """A quality run's folder: ``findings.json``, ``quality.md`` and one contact sheet per finding."""

    @property
    def findings(self) -> Path:
        return self.folder / "findings.json"

    @property
    def report(self) -> Path:
        return self.folder / "quality.md"

    def sheet(self, finding: str) -> Path:
        return self.folder / f"{finding}.png"


class IndexFiles(StageFiles, folder="indexes", kind="index"):
    """A FAISS index's folder: ``index.faiss`` beside its spec and result."""

    @property
    def index(self) -> Path:
        return self.folder / "index.faiss"


class PredictionFiles(StageFiles, folder="predictions", kind="predict"):
    """A prediction run's folder: ``predictions.parquet`` (or ``.csv``), ``report.md`` (how far to trust them:
    calibration, coverage on test, the OOD score) and ``bad_images.csv`` listing the images that could not be
    decoded (with ``on_bad_image: skip``)."""

    def table(self, format: str) -> Path:
        return self.folder / f"predictions.{format}"

    @property
    def report(self) -> Path:
        return self.folder / "report.md"

    @property
    def bad_images(self) -> Path:
        return self.folder / "bad_images.csv"

    @property
    def parts(self) -> Path:
        """The scored blocks of a run not yet published (``<key>.tmp-parts/``, one Parquet file per block): a
        killed run's next try scores only the blocks it lacks. Removed when the table is published; ``cache gc``
        removes an abandoned one with the other leftovers of interrupted writes."""
        return self.folder.with_name(f"{self.folder.name}.tmp-parts")

    def part(self, block: int) -> Path:
        return self.parts / f"{block:06d}.parquet"


class ModelFiles(StageFiles, folder="models", kind="export-model"):
    """An exported model's folder: ``model.onnx``, ``model.pt2``, ``model.safetensors``, ``config.json`` and
    ``README.md`` (the model card), beside its spec and result."""

    def file(self, name: str) -> Path:
        return self.folder / name

    @property
    def onnx(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def program(self) -> Path:
        return self.folder / "model.pt2"

    @property
    def config(self) -> Path:
        return self.folder / "config.json"


@dataclass(frozen=True)
class ReportFiles(StageFiles):
    """An evaluation's folder: its spec and result marker, ``report.json``, ``report.md`` and PNG plots."""

    @property
    def report_json(self) -> Path:
        return self.folder / "report.json"

    @property
    def report_md(self) -> Path:
        return self.folder / "report.md"

    def plot(self, name: str) -> Path:
        return self.folder / f"{name}.png"


@dataclass(frozen=True)
class SelectionFiles:
    """``select.json`` and ``select.md`` of one ``transferpipe select``."""

    folder: Path

    @property
    def json(self) -> Path:
        return self.folder / "select.json"

    @property
    def markdown(self) -> Path:
        return self.folder / "select.md"


def _specs(values: Iterable[Any], field: str | None = None) -> list[dict[str, Any]]:
    found = (v.get(field) if field and isinstance(v, dict) else v for v in values)
    return [v for v in found if isinstance(v, dict)]


def stored_specs(cache_dir: str | Path, kind: str, experiment: str = "*") -> list[dict[str, Any]]:
    """The key spec of every stored artifact of ``kind`` (heads, finetune, evaluate, scores, or a declared stage
    folder's kind): what
    ``transferpipe plan`` compares a new key with to say why it is not cached."""
    layout = CacheLayout(cache_dir)
    files = {
        "heads": lambda: _specs(map(read_json, layout.heads().glob("*/head.json")), "spec"),
        "finetune": lambda: _specs(map(read_json, layout.finetune_runs().glob("*/spec.json"))),
        "evaluate": lambda: _specs(map(read_json, layout.reports(experiment).glob("*/spec.json"))),
        "scores": lambda: _specs(Records(layout.scores).values(), "spec"),
        **{kind: _spec_files(layout, cls) for kind, cls in STAGE_FOLDERS.items()},
    }
    if kind not in files:
        raise ValueError(f"no stored specs of kind {kind!r}; kinds: {', '.join(files)}")
    return files[kind]()


def _spec_files(layout: CacheLayout, cls: type[StageFiles]) -> Callable[[], list[dict[str, Any]]]:
    return lambda: _specs(map(read_json, layout.stage_folder(cls.cache_folder or "").glob("*/spec.json")))


def stage_folders(cache_dir: str | Path) -> list[Path]:
    """The folders of every stage files class that declares one (``exports/``, ``quality/``, ...)."""
    layout = CacheLayout(cache_dir)
    return [layout.stage_folder(cls.cache_folder) for cls in STAGE_FOLDERS.values() if cls.cache_folder]
