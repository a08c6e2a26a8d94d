"""Console output and the CLI's error boundary, shared by every command module."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from flows.defaults import CACHE_DIR_HELP

#: the ``--cache-dir`` option of every command that reads or writes the cache
CacheDir = Annotated[Optional[Path], typer.Option("--cache-dir", help=CACHE_DIR_HELP)]

# user text (paths, config values, error messages) is never read as rich markup: a path holding "[/x]"
# crashed the error printer with a MarkupError. Styles go through ``styled``.
out = Console(markup=False)
err = Console(stderr=True, markup=False)


def styled(head: str, style: str, rest: str = "") -> Any:
    """``head`` in ``style``, then ``rest`` as plain text (no markup parsed in either)."""
    from rich.text import Text

    return Text.assemble((head, style), rest)


def print_table(title: str, columns: list[str], rows: list[list[str]], markdown: bool = False) -> None:
    """A table on stdout: rich's, or GitHub markdown (what the README holds, pasted as it is)."""
    if markdown:
        lines = [f"| {' | '.join(columns)} |", f"|{'|'.join('---' for _ in columns)}|"]
        print("\n".join([*lines, *(f"| {' | '.join(row)} |" for row in rows)]))
        return
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr instead of a traceback: exit 2 for bad input, 1 for a failed run.

    ``TRANSFERPIPE_DEBUG=1`` shows the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary of the program
            if os.environ.get("TRANSFERPIPE_DEBUG"):
                raise
            err.print(styled("error:", "bold red", f" {exc}"), highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(exc, ValueError) else 1) from None

    return wrapper
