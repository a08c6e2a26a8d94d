"""A config's validation errors as a person reads them: one line per problem, naming the key and what is allowed
there (an unknown key: the allowed keys and the one most likely meant)."""
from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError


def format_errors(exc: ValidationError, source: str, model: type[BaseModel], what: str) -> str:
    """One line per problem under a head naming the file; an unknown key lists the keys allowed there and the one
    most likely meant."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1], model)
            close = _close_key(str(err["loc"][-1]), allowed)
            hint = f" (did you mean {close!r}?)" if close else ""
            lines.append(f"{loc}: unknown key{hint}; allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool, type(None))) and err["type"] != "missing" else ""
        lines.append(f"{loc}: {msg}{shown}")
    head = f"{source}: {len(lines)} problem(s) in the {what}"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def _close_key(typo: str, allowed: list[str]) -> str | None:
    """The allowed key a typo most likely meant, or None: the closest spelling, a key inside the typo or the typo
    inside it counting extra (``crop_size``: ``crop``, ``epoch``: ``epochs`` rather than ``warmup_epochs``)."""
    def score(key: str) -> float:
        inside = len(key) > 2 and (key in typo or typo in key)
        return difflib.SequenceMatcher(None, typo, key).ratio() + (0.3 if inside else 0.0)

    best = max(allowed, key=score, default=None)
    return best if best is not None and score(best) >= 0.6 else None


def _allowed_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    """Field names of the section at ``loc``: walks nested models, lists, optionals and tagged unions (a head's
    ``heads.0.logistic`` is the union member whose ``kind`` is ``logistic``)."""
    current = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [m for m in current if part in _tags(m)]
        if tagged:
            current = tagged
            continue
        owner = next((m for m in current if part in m.model_fields), None)
        found = list(_models(owner.model_fields[part].annotation)) if owner else []
        if not found:
            break
        current = found
    return list(current[0].model_fields)


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models inside an annotation (through Annotated, unions, lists and optionals)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def _tags(model: type[BaseModel]) -> set[str]:
    """The values of a model's ``kind`` literal (a tagged union's member names)."""
    field = model.model_fields.get("kind")
    return set(typing.get_args(field.annotation)) if field is not None else set()
