"""The head configs (``heads:`` entries): the one schema of every head kind's parameters and their defaults.

The estimators (:mod:`tasks.heads.estimators`) take their constructor defaults from
here (:func:`default`), and ``tests/test_heads.py`` checks that every
estimator's parameters are exactly its config's, so a parameter is spelled in
its config and its estimator's signature, and its default only here. Importing
this module imports neither scikit-learn nor torch.
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

Shot = Union[int, Literal["all"]]


class _HeadBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: a linear probe on the backbone's features: LP-FT may start the fine-tuned classifier from it
    linear_probe: ClassVar[bool] = False

    name: str | None = Field(None, description="label in reports; default: the kind")
    layer: str = "penultimate"
    preprocess: Literal["none", "standardize", "l2"] = "standardize"
    shots: list[Shot] = Field(default_factory=lambda: ["all"], min_length=1)
    seeds: int = Field(3, ge=1, le=100, description="few-shot subsets drawn per shot count (averaged)")
    seed: int = 0
    refit: Literal["train", "train+val"] = "train"
    align: Literal["none", "coral"] = Field(
        "none", description="coral: map training features to the test split's feature statistics (no test labels used)"
    )

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[Shot]) -> list[Shot]:
        bad = [s for s in v if s != "all" and (not isinstance(s, int) or s < 1)]
        if bad:
            raise ValueError(f"shots must be positive integers or 'all', got {bad}")
        return v

    @property
    def label(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]

    def needs_target(self) -> bool:
        """Whether the head reads the test split's features (no labels) while it is trained."""
        return self.align == "coral"

    def estimator_params(self) -> dict[str, Any]:
        """Constructor arguments of the estimator: this config minus the stage's own fields."""
        stage = {"name", "layer", "shots", "seeds", "seed", "kind"}
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.model_dump().items() if k not in stage}
        return {**params, "random_state": self.seed}


def _positive(values: list[float], name: str, allow_zero: bool = False) -> list[float]:
    bad = [v for v in values if v < 0 or (v == 0 and not allow_zero)]
    if bad or not values:
        raise ValueError(f"{name} needs values {'>=' if allow_zero else '>'} 0, got {values}")
    return values


def _grid(values: tuple) -> Any:
    """A default grid (a fresh list each time)."""
    return Field(default_factory=lambda: list(values))


class LogisticConfig(_HeadBase):
    kind: Literal["logistic"]
    linear_probe = True
    C: list[float] = _grid(tuple(10.0 ** e for e in range(-6, 7)))
    max_iter: int = Field(1000, ge=1)
    tol: float = Field(1e-6, gt=0, description="each candidate of the C path stops when no gradient component of the "
                                               "mean loss exceeds this (scikit-learn's tol, Newton-CG); the kept "
                                               "model continues to tol/100")
    n_jobs: int = Field(1, description="parallel warm-started runs over the grid (-1: one per core)")

    _check = field_validator("C")(lambda v: _positive(v, "C"))


class LinearConfig(_HeadBase):
    kind: Literal["linear"]
    linear_probe = True
    weight_decay: list[float] = _grid((0.0, 1e-4, 1e-3, 1e-2, 1e-1))
    optimizer: Literal["lbfgs", "adamw"] = "lbfgs"
    max_iter: int = Field(200, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    device: str = "auto"

    _check = field_validator("weight_decay")(lambda v: _positive(v, "weight_decay", allow_zero=True))


class KNNConfig(_HeadBase):
    kind: Literal["knn"]
    preprocess: Literal["none", "standardize", "l2"] = "l2"
    k: list[int] = _grid((1, 5, 10, 20, 50, 100))
    temperature: float = Field(0.07, gt=0)
    chunk_size: int = Field(4096, ge=1)
    device: str = "auto"

    _check = field_validator("k")(lambda v: [int(x) for x in _positive(v, "k")])


class RidgeConfig(_HeadBase):
    kind: Literal["ridge"]
    alpha: list[float] = _grid(tuple(10.0 ** e for e in range(-2, 5)))

    _check = field_validator("alpha")(lambda v: _positive(v, "alpha"))


class SVMConfig(_HeadBase):
    kind: Literal["svm"]
    C: list[float] = _grid(tuple(10.0 ** e for e in range(-4, 1)))
    max_iter: int = Field(2000, ge=1)

    _check = field_validator("C")(lambda v: _positive(v, "C"))


class PrototypeConfig(_HeadBase):
    """Nearest class mean on centred, L2-normalised features ("SimpleShot", Wang et al. 2019): the few-shot
    baseline that costs nothing to train."""

    kind: Literal["prototype"]
    preprocess: Literal["none", "standardize", "l2"] = "none"
    centre: Literal["train", "target"] = Field(
        "train", description="subtract the mean of the training features, or of the test split's (no labels used)")
    temperature: list[float] = _grid((0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))

    _check = field_validator("temperature")(lambda v: _positive(v, "temperature"))

    def needs_target(self) -> bool:
        return super().needs_target() or self.centre == "target"


#: the config class of each head kind (``kind:``)
CONFIGS: dict[str, type[_HeadBase]] = {c.model_fields["kind"].annotation.__args__[0]: c
                                       for c in (LogisticConfig, LinearConfig, KNNConfig, RidgeConfig, SVMConfig,
                                                 PrototypeConfig)}


#: a ``heads:`` entry: one of CONFIGS, told apart by ``kind``
HeadConfig = Annotated[Union[tuple(CONFIGS.values())], Field(discriminator="kind")]


def default(config: type[_HeadBase], name: str) -> Any:
    """The default of one parameter of a head kind, as its estimator takes it (a grid as a tuple)."""
    field = config.model_fields[name]
    value = field.get_default(call_default_factory=True)
    return tuple(value) if isinstance(value, list) else value
