"""The experiment config: one YAML file per experiment, validated once at the entry point.

Stage configs live beside their stage (``tasks/*.py``); this model composes
them. Errors name the file, the field path, the bad value and what is allowed.
"""
from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tasks.backbones import BackboneConfig
from tasks.data import DataConfig, resolve_path
from tasks.extract import ExtractConfig
from tasks.finetune import FinetuneConfig
from tasks.head_stage import HeadConfig
from tasks.select import SelectConfig

CACHE_ENV = "TRANSFERPIPE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/transferpipe")


class ConfigError(ValueError):
    """An invalid experiment config; the message lists every problem."""


class ExperimentConfig(BaseModel):
    """One experiment: data, backbone and stage settings. Frozen: never mutated after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()
    heads: list[HeadConfig] = Field(default_factory=list, description="heads trained on the cached features")
    finetune: FinetuneConfig = FinetuneConfig()
    select: SelectConfig | None = Field(None, description="candidate backbones for transferpipe select")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description=f"overridden by ${CACHE_ENV} and --cache-dir")
    retries: int = Field(2, ge=0, le=20, description="retries of a failed stage")
    retry_delay_s: float = Field(5.0, ge=0, description="first retry delay; doubles each retry")

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, v: Path, info: ValidationInfo) -> Path:
        return resolve_path(v, info)


def default_cache_dir(flag: str | Path | None = None) -> Path:
    """The cache folder when no config is given: ``--cache-dir``, else ``$TRANSFERPIPE_CACHE_DIR``, else the default."""
    chosen = flag or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser().absolute()


def load_config(path: str | Path, cache_dir: str | Path | None = None) -> ExperimentConfig:
    """Read and validate a YAML config. ``cache_dir`` (the CLI flag) beats ``$TRANSFERPIPE_CACHE_DIR``, which beats the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    return parse_config(raw, source=str(path), base_dir=path.resolve().parent, cache_dir=cache_dir)


def parse_config(
    raw: dict[str, Any], source: str = "<config>", base_dir: Path | None = None, cache_dir: str | Path | None = None
) -> ExperimentConfig:
    override = cache_dir or os.environ.get(CACHE_ENV)
    if override:
        raw = {**raw, "cache_dir": str(Path(override).expanduser().absolute())}
    try:
        return ExperimentConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(err["loc"][:-1])
            lines.append(f"{loc}: unknown key; allowed here: {', '.join(allowed)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float, bool, type(None))) and err["type"] != "missing" else ""
        lines.append(f"{loc}: {msg}{shown}")
    head = f"{source}: {len(lines)} problem(s) in the experiment config"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``loc`` (walks nested models, lists and optionals)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *typing.get_args(annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)
