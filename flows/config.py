"""The experiment config: one YAML file per experiment, validated once at the entry point.

Stage configs live beside their stage (``tasks/*/plan.py``) and each stage declares its section
(tasks/stages.py); this model composes them. Errors name the file, the field path, the bad value and what is
allowed.
"""
from __future__ import annotations

import copy
import json
import itertools
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from flows.config_errors import format_errors
from flows.defaults import CACHE_ENV, DEFAULT_CACHE_DIR, cache_dir_override
from tasks.backbones.config import BackboneConfig
from tasks.data.config import DataConfig, resolve_path
from tasks.stages import STAGES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
MAX_SWEEP = 1000


class ConfigError(ValueError):
    """An invalid experiment config; the message lists every problem."""


class DaskConfig(BaseModel):
    """``dask:`` section: extraction sharded over Dask workers (prefect-dask). Absent: one process.

    Workers need the cache folder on a shared file system (one machine: nothing
    to do) and a Prefect server (``PREFECT_API_URL``): in ephemeral mode every
    worker process would start its own.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description="an existing scheduler, e.g. tcp://10.0.0.5:8786; "
                                                  "none: a LocalCluster on this machine")
    workers: int = Field(2, ge=1, le=1024, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, le=256)
    gpus_per_worker: int = Field(0, ge=0, le=16, description="GPUs each shard task needs (Dask resource GPU)")
    shards: int | None = Field(None, ge=1, le=4096, description="work units per split, each whole pieces (default: workers)")

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(tcp|tls|inproc|ucx)://[^\s/]+$", v):
            raise ValueError(f"address {v!r} is not a Dask scheduler address like tcp://HOST:8786")
        return v


class SweepConfig(BaseModel):
    """``sweep:`` section (or a ``--sweep`` file): many experiments from one base config.

    Overrides are dotted paths into the base config (``finetune.lr_backbone``,
    ``backbone.name``, ``heads``); a value replaces what is there. ``grid``
    runs every combination; ``experiments`` lists override sets, one
    experiment each (an optional ``name`` names it). Both may be given.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, pattern=NAME_PATTERN, max_length=60,
                             description="prefix of the experiment names (default: the base config's name)")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    experiments: list[dict[str, Any]] = Field(default_factory=list)
    concurrency: int = Field(2, ge=1, le=64, description="experiments run at once")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [path for path, values in v.items() if not values]
        if empty:
            raise ValueError(f"grid values must be non-empty lists; empty: {', '.join(empty)}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> SweepConfig:
        if not self.grid and not self.experiments:
            raise ValueError("a sweep needs a grid: mapping of dotted paths to value lists, or an experiments: list")
        if self.size() > MAX_SWEEP:
            raise ValueError(f"this sweep expands to {self.size()} experiments; at most {MAX_SWEEP}")
        return self

    def size(self) -> int:
        return len(self.experiments) + (math.prod(len(v) for v in self.grid.values()) if self.grid else 0)

    def override_sets(self) -> list[dict[str, Any]]:
        """One dict of dotted-path overrides per experiment: the listed ones, then the grid's combinations."""
        combos = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] if self.grid else []
        return [dict(entry) for entry in self.experiments] + combos


class _Experiment(BaseModel):
    """One experiment: data, backbone and stage settings. Frozen: never mutated after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = Field(default_factory=BackboneConfig.model_construct)  # the default is valid: no torchvision at import


#: the settings after the stages' sections
_RUN_FIELDS: dict[str, Any] = {
    "cache_dir": (Path, Field(DEFAULT_CACHE_DIR, description=f"overridden by ${CACHE_ENV} and --cache-dir")),
    "retries": (int, Field(2, ge=0, le=20, description="retries of a failed stage")),
    "retry_delay_s": (float, Field(5.0, ge=0, description="first retry delay; doubles each retry")),
    "sweep": (SweepConfig | None, Field(None, description="run many experiments from this one (transferpipe run)")),
    "dask": (DaskConfig | None, Field(None, description="shard extraction over Dask workers")),
}


def _cache_dir(cls: type, v: Path, info: ValidationInfo) -> Path:
    return resolve_path(v, info)


#: name, data and backbone, one section per declared stage (tasks/stages.py, in run order), then the run's settings
ExperimentConfig = create_model(
    "ExperimentConfig", __base__=_Experiment, __module__=__name__,
    __validators__={"_cache_dir": field_validator("cache_dir")(classmethod(_cache_dir))},
    **{s.section.name: (s.section.model, s.section.default) for s in STAGES if s.section}, **_RUN_FIELDS,
)


def as_config(value: ExperimentConfig | dict[str, Any]) -> ExperimentConfig:
    """Flows take an ExperimentConfig; Prefect re-running a flow run (``flow-run retry``) passes its JSON form."""
    return value if isinstance(value, ExperimentConfig) else ExperimentConfig.model_validate(value)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from ``path`` (``yaml.safe_load``); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, cache_dir: str | Path | None = None) -> ExperimentConfig:
    """Read and validate a YAML config. ``cache_dir`` (the CLI flag) beats ``$TRANSFERPIPE_CACHE_DIR``, which beats the file."""
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.resolve().parent, cache_dir=cache_dir)


def load_sweep(
    config: str | Path, sweep: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[SweepConfig, list[ExperimentConfig]]:
    """The experiments of a sweep: the base config with each override set applied, all validated up front.

    The sweep comes from the ``--sweep`` file when given, else from the config's
    ``sweep:`` section; its ``name`` defaults to the base config's. Errors name
    the file, the experiment and the field.
    """
    config = Path(config)
    base = read_yaml(config)
    section = base.pop("sweep", None)
    source = str(sweep) if sweep is not None else f"{config}: sweep"
    raw_sweep = read_yaml(sweep, "sweep file") if sweep is not None else section
    if raw_sweep is None:
        raise ConfigError(f"{config} has no sweep: section; add one or pass --sweep SWEEP.yaml")
    try:
        sweep_cfg = SweepConfig.model_validate(raw_sweep)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, SweepConfig, "sweep")) from None
    sweep_cfg = sweep_cfg.model_copy(update={"name": sweep_cfg.name or str(base.get("name", "sweep"))})
    prefix = sweep_cfg.name
    experiments, problems, names = [], [], set()
    for i, overrides in enumerate(sweep_cfg.override_sets()):
        label = overrides.pop("name", None)
        name = _experiment_name(prefix, i, label, overrides)
        where = f"{source}: experiment {i + 1} ({name})"
        if name in names:
            problems.append(f"{where}: duplicate experiment name")
            continue
        names.add(name)
        raw = copy.deepcopy(base)
        try:
            for path, value in overrides.items():
                _set_path(raw, path, value)
            raw["name"] = name
            experiments.append(parse_config(raw, source=where, base_dir=config.resolve().parent, cache_dir=cache_dir))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return sweep_cfg, experiments


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``path = "a.b.c"``, creating mappings on the way."""
    parts = path.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {path!r}: {'.'.join(parts[: depth + 1])} is a {type(child).__name__}, not a mapping; "
                "override the whole value instead"
            )
        node = child
    node[parts[-1]] = value


def _experiment_name(prefix: str, index: int, label: str | None, overrides: dict[str, Any]) -> str:
    """``<prefix>-<label>`` or ``<prefix>-NN-<leaf>-<value>...``: readable, unique, a valid experiment name."""
    if label is not None:
        return f"{prefix}-{label}"
    parts = [f"{path.split('.')[-1]}-{_slug(value)}" for path, value in overrides.items()]
    return f"{prefix}-{index + 1:02d}" + "".join(f"-{p}" for p in parts)[: 100 - len(prefix) - 6]


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")[:24] or "x"


def parse_config(
    raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None, cache_dir: str | Path | None = None
) -> ExperimentConfig:
    override = cache_dir_override(cache_dir)
    if override:
        raw = {**raw, "cache_dir": str(override)}
    cache = Path(str(raw.get("cache_dir") or DEFAULT_CACHE_DIR)).expanduser()
    if not cache.is_absolute() and base_dir is not None:
        cache = base_dir / cache
    try:  # the cache dir in the context lets the backbone section reuse what torchvision said before
        return ExperimentConfig.model_validate(raw, context={"base_dir": base_dir, "cache_dir": cache})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, ExperimentConfig, "experiment config")) from None
