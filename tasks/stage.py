"""What every stage returns: small, JSON-serialisable, and honest about cache hits."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class StageResult(BaseModel):
    """Base of stage results. ``cache_hit`` says the stage did no work this time."""

    cache_hit: bool
    seconds: float

    #: fields that describe work done, zeroed when the result is served from a cache
    work_fields: tuple[str, ...] = ()

    def cached(self) -> Any:
        """This result as served from a cache: no work, no time."""
        return self.model_copy(update={"cache_hit": True, "seconds": 0.0, **{f: 0 for f in self.work_fields}})
