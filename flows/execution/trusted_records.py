"""Prefect's result records of the stages, read as untrusted hints: a record that is not exactly one transferpipe
writes is a miss, never a reason to import or run anything.

Prefect reads a record with the serializer the record itself names: ``{"type": "pickle"}`` unpickles its payload,
a ``picklelib`` or ``jsonlib`` names a module Prefect imports, and the JSON serializer's ``{"__class__": ...}``
imports any importable module. The records live in the cache folder (``<cache>/prefect-records/``), which teams
share between users and machines, so whoever can write there could otherwise run code in the next user's ``run``.

:class:`StageRecords` is the stages' result storage: it checks every record as plain JSON (the standard library's
parser, which imports nothing) before Prefect sees a byte of it. A record passes only in the shape
``result_serializer="json"`` writes for a stage result:

* exactly ``metadata`` and ``result``; the metadata's serializer exactly Prefect's default JSON serializer; its
  ``storage_key`` the record's own file name; no expiration;
* a result that is one ``{"__class__": <a StageResult subclass already imported>, "data": {...}}`` with no other
  ``__class__`` anywhere in it (importing a module that is already imported runs nothing).

Anything else (pickle, another library, a class that moved or never was, damage) is named in one warning and read
as a miss: the stage then checks its store, reuses or recomputes, and Prefect writes a fresh record over it. What
a run reports for a cached stage never comes from a record at all (:func:`flows.execution.stage_tasks.stage_result` asks the
store), so a well-formed but edited record cannot change a number either.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer

from tasks.result import StageResult

log = logging.getLogger("transferpipe.records")

#: the serializer of every record a stage writes (``result_serializer="json"``), as Prefect writes it
SERIALIZER = JSONSerializer().model_dump(mode="json")
METADATA_FIELDS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}

_warned: set[str] = set()


class UntrustedRecord(ValueError):
    """A record that is not exactly one transferpipe writes; Prefect treats the error as a cache miss."""


def stage_result_classes() -> set[str]:
    """Qualified names of every stage result class (subclasses of :class:`StageResult`, all already imported)."""
    found, todo = set(), [StageResult]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.add(f"{sub.__module__}.{sub.__qualname__}")
            todo.append(sub)
    return found


def is_stage_result(qualified: Any) -> bool:
    """Whether ``qualified`` names a stage result class: one of :func:`stage_result_classes`, or a name an
    already-imported module of transferpipe gives one (a class that moved to its package's plan module and is
    still imported where records written before the move name it). Checked in ``sys.modules`` only: nothing is
    imported."""
    if not isinstance(qualified, str):
        return False
    if qualified in stage_result_classes():
        return True
    module, _, name = qualified.rpartition(".")
    found = getattr(sys.modules.get(module), name, None) if module.startswith("tasks.") else None
    return isinstance(found, type) and issubclass(found, StageResult)


def problem(name: str, content: bytes) -> str | None:
    """Why ``content`` (the record stored as ``name``) is not one transferpipe writes; None when it is."""
    try:
        record = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return "not JSON"
    if not isinstance(record, dict) or set(record) != {"metadata", "result"}:
        return "not a record of metadata and result"
    metadata = record["metadata"]
    if not isinstance(metadata, dict) or not set(metadata) <= METADATA_FIELDS:
        return "unexpected metadata fields"
    if metadata.get("serializer") != SERIALIZER:
        return f"serializer {_short(metadata.get('serializer'))}, not Prefect's default JSON serializer"
    if metadata.get("storage_key") != name or metadata.get("expiration") is not None:
        return "storage key or expiration not its own"
    if not isinstance(record["result"], str):
        return "result not a JSON string"
    try:
        result = json.loads(record["result"])
    except ValueError:
        return "result not JSON"
    if not isinstance(result, dict) or set(result) != {"__class__", "data"} or not isinstance(result["data"], dict):
        return "result not one stage result"
    if not is_stage_result(result["__class__"]):
        return f"result class {_short(result['__class__'])} is not a stage result of this version"
    if _names_a_class(result["data"]):
        return "a __class__ inside the result"
    return None


def _names_a_class(value: Any) -> bool:
    if isinstance(value, dict):
        return "__class__" in value or any(_names_a_class(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_class(v) for v in value)
    return False


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checked(path: Path, content: bytes) -> bytes:
    """``content`` if it is a record transferpipe writes; else one warning naming the file and UntrustedRecord."""
    why = problem(path.name, content)
    if why is None:
        return content
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning("Prefect record %s is not one transferpipe writes (%s): not read, a cache miss; the stage checks "
                    "its store and the record is replaced", path, why)
    raise UntrustedRecord(f"Prefect record {path} is not one transferpipe writes: {why}")


class StageRecords(LocalFileSystem):
    """A local folder of stage records that Prefect reads only after :func:`checked` passed them."""

    _block_type_name = "transferpipe stage records"
    _block_type_slug = "transferpipe-stage-records"
    _description = "Prefect result records of transferpipe's stages; records not in transferpipe's own shape are misses."

    def _checked_read(self, path: str) -> bytes:
        file = self._resolve_path(path)
        if not file.is_file():
            raise ValueError(f"Path {file} does not exist.")
        return checked(file, file.read_bytes())

    async def aread_path(self, path: str) -> bytes:
        return self._checked_read(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._checked_read(path)
