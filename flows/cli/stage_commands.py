"""The plain commands of declared stages: ``transferpipe <stage> CONFIG [--flag ...]``, derived from each stage's
``Command`` (tasks/declare.py), so a new stage's command is written once, in its declaration.

Each flag is a field of the stage's section (its help is the field's description; a fixed set of values is
checked and named), ``--data PATH`` reads the section's ``data`` from a folder (``source: files``), a table
file or tar shards, ``--out FILE`` copies the stage's table there atomically; the run is the pipeline up to
the stage, and the result prints as the declaration's ``show`` says.
"""
from __future__ import annotations

import inspect
import shutil
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flows.cli.console import CacheDir, friendly_errors, out, print_table
from tasks.declare import Stage
from tasks.stages import STAGES

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")


def with_flags(cfg: Any, section: str, model: type, given: dict[str, Any]) -> Any:
    """The config with a command's flags (those given) over its ``section:``; a flag whose field takes a fixed
    set of values is checked against it, named as the flag."""
    for field, value in list(given.items()):
        annotation = model.model_fields[field].annotation
        if typing.get_origin(annotation) is list and isinstance(value, str):  # --formats onnx,pt2
            given[field] = value = [v.strip() for v in value.split(",") if v.strip()]
            annotation = typing.get_args(annotation)[0]
            allowed = typing.get_args(annotation)
            bad = [v for v in value if allowed and v not in allowed]
            if bad:
                raise ValueError(f"--{field.replace('_', '-')} {bad[0]!r}: use one or more of {', '.join(allowed)}")
            continue
        allowed = typing.get_args(annotation)
        if value is not None and allowed and all(isinstance(a, str) for a in allowed) and value not in allowed:
            raise ValueError(f"--{field.replace('_', '-')} {value!r}: use one of {', '.join(allowed)}")
    current = getattr(cfg, section) or model()
    wanted = model.model_validate({**current.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    return cfg.model_copy(update={section: wanted})


def data_from(path: Path) -> dict[str, Any]:
    """A ``data:`` section for a path given on the command line: a folder (every image under it, unlabelled), a
    Parquet/CSV/JSONL table of images, or WebDataset shards."""
    path = path.expanduser().resolve()
    if path.is_dir():
        return {"source": "files", "root": path}
    if path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
        return {"source": "table", "path": str(path)}
    if path.suffix.lower() == ".tar" and path.is_file():
        return {"source": "webdataset", "shards": [str(path)]}
    raise ValueError(f"--data {path}: not a folder of images, a table file ({', '.join(TABLE_SUFFIXES)}) or a .tar "
                     "shard")


def check_out(path: Path, folder: bool = False, force: bool = False) -> None:
    """``--out``: its parent must exist and be writable, and a folder to write must not exist (unless
    ``--force``); said before anything runs."""
    import os

    parent = path.expanduser().resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {path}: its folder {parent} does not exist or is not writable")
    if folder and path.exists() and not force:
        raise ValueError(f"--out {path} exists; choose a new folder or pass --force to replace it")


def copy_out(source: Path, target: Path) -> Path:
    """Copy a stage's table (or folder, without its spec and result) to ``target`` through a temporary name: no
    half-written file or folder under the name."""
    target = target.expanduser().resolve()
    tmp = target.with_name(f".{target.name}.tmp")
    if source.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("spec.json", "result.json"))
        if target.exists():
            shutil.rmtree(target)
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(target)
    return target


def _flag_type(annotation: Any) -> Any:
    """A command-line type for a section field: int, float, bool or str (a Literal's values are checked later)."""
    return annotation if annotation in (int, float, bool) else str


def _parameters(stage: Stage) -> list[inspect.Parameter]:
    model, command = stage.section.model, stage.command
    model = next(a for a in typing.get_args(model) if a is not type(None)) if typing.get_args(model) else model
    params = [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="Experiment config (YAML).", show_default=False)])]
    if command.data_flag:
        params.append(inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--data", help="The images: a folder (every image under it), a table file "
                                                       "or .tar shards; default: the config's section.")]))
    for name in command.flags:
        field = model.model_fields[name]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[_flag_type(field.annotation)], typer.Option(
                f"--{name.replace('_', '-')}", help=f"{field.description or name} (default {field.default!r}).")]))
    if command.out_flag:
        what = "folder" if command.out_folder else "table"
        params.append(inspect.Parameter("out_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--out", help=f"Copy the {what} here too (it stays in the cache).")]))
    if command.out_folder:
        params.append(inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--force", help="Replace --out when it exists.")]))
    params.append(inspect.Parameter("cache_dir", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=CacheDir))
    return params


def command(stage: Stage, pipeline: Any, load: Any) -> Any:
    """The ``transferpipe <stage>`` function for typer; ``pipeline(config, cache_dir, goal, cfg)`` runs the
    flow and ``load(config, cache_dir)`` reads the config (flows/cli.py's)."""
    model = stage.section.model
    model = next(a for a in typing.get_args(model) if a is not type(None)) if typing.get_args(model) else model

    def run(config: Path, data: Path | None = None, out_file: Path | None = None, cache_dir: Path | None = None,
            force: bool = False, **flags: Any) -> None:
        if out_file is not None:
            check_out(out_file, folder=stage.command.out_folder, force=force)
        given = dict(flags) | ({"data": data_from(data)} if data is not None else {})
        cfg = with_flags(load(config, cache_dir), stage.section.name, model, given)
        result = pipeline(config, cache_dir, stage.name, cfg)[1]
        show(stage, cfg, result.outputs[stage.name])
        if out_file is not None:
            done = result.outputs[stage.name][0]
            path = copy_out(done.folder if stage.command.out_folder else done.path, out_file)
            out.print(f"copied to {path}", highlight=False, soft_wrap=True)

    run.__signature__ = inspect.Signature(_parameters(stage))  # type: ignore[attr-defined]
    run.__name__, run.__doc__ = stage.name, stage.command.help
    return friendly_errors(run)


def show(stage: Stage, cfg: Any, results: list[Any]) -> None:
    """A stage's results as its declaration says: a table and the lines below it."""
    title, headers, rows, lines = stage.command.show(cfg, results)
    print_table(title, headers, [[str(c) for c in row] for row in rows])
    if lines:
        out.print("\n".join(lines), highlight=False, soft_wrap=True)


def declared() -> dict[str, Stage]:
    """Every stage that declares a command, by command name."""
    return {s.name: s for s in STAGES if s.command is not None and s.section is not None}


def click_command(name: str, pipeline: Any, load: Any) -> Any:
    """The click command of a declared stage (built when asked for: the CLI imports no plan module to run
    ``results`` or ``server``), or None."""
    stage = declared().get(name)
    if stage is None:
        return None
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(stage.name, help=stage.command.help)(command(stage, pipeline, load))
    return typer.main.get_command(single)
