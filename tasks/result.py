"""What every stage returns: small, JSON-serialisable, and honest about cache hits."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StagePlan(BaseModel):
    """Base of stage plans: small and frozen (they cross task boundaries), with the stage's ``key`` and the
    ``spec`` it hashes (what ``plan`` compares with stored specs to say why a key is not cached)."""

    model_config = ConfigDict(frozen=True)

    key: str
    spec: dict[str, Any]


class StageResult(BaseModel):
    """Base of stage results. ``cache_hit`` says the stage did no work this time."""

    cache_hit: bool
    seconds: float

    #: fields that describe work done, zeroed when the result is served from a cache
    work_fields: tuple[str, ...] = ()

    def cached(self) -> Any:
        """This result as served from a cache: no work, no time."""
        return self.model_copy(update={"cache_hit": True, "seconds": 0.0, **{f: 0 for f in self.work_fields}})


def summarize(results: StageResult | list[StageResult]) -> dict[str, float | bool]:
    """One stage's time, cache status and work done (forward batches, fits, epochs), over its results."""
    results = results if isinstance(results, list) else [results]
    work = {f: sum(getattr(r, f) for r in results) for f in results[0].work_fields}
    return {"seconds": sum(r.seconds for r in results), "cache_hit": all(r.cache_hit for r in results), **work}
