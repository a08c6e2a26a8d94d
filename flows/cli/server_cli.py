"""``transferpipe server``: a persistent local Prefect server that later commands reuse."""
from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.console import friendly_errors, out
from flows.defaults import DEFAULT_PORT
from flows.execution.server import RETENTION_DAYS

app = typer.Typer(no_args_is_help=True, help=(
    "A persistent local Prefect server (127.0.0.1, SQLite in $PREFECT_HOME) that later commands reuse: "
    "saves the ~8 s an ephemeral server costs each command."))


@app.command("start")
@friendly_errors
def server_start(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = DEFAULT_PORT,
    retention_days: Annotated[float, typer.Option(
        "--retention-days", help="Flow runs (with their logs and artifacts) that ended longer ago are deleted "
                                 "hourly by Prefect's database vacuum; results and the cache stay.")] = RETENTION_DAYS,
) -> None:
    """Start the local server in the background (or say where the running one is); commands then use it."""
    from flows.execution.server import start_persistent

    server, started = start_persistent(port, retention_days)
    out.print(f"{'started' if started else 'already running'}: {server.url} (log {server.log}); commands use it "
              "until `transferpipe server stop`", highlight=False)
    out.print(f"UI: {server.url.removesuffix('/api')} (runs, their logs, the report artifacts)", highlight=False)
    if started:
        out.print(f"database vacuum: flow runs that ended over {retention_days:g} days ago are deleted hourly with "
                  "their logs and artifacts (events after 7 days); cached results stay", highlight=False)


@app.command("status")
@friendly_errors
def server_status() -> None:
    """Whether the local server runs and where (exit 1 if it does not)."""
    from flows.execution.server import remembered

    server = remembered()
    if server is None:
        out.print("no local server running: commands use Prefect's ephemeral mode (start one: transferpipe server start)")
        raise typer.Exit(1)
    out.print(f"running: {server.url} (pid {server.pid}, log {server.log})", highlight=False, soft_wrap=True)


@app.command("stop")
@friendly_errors
def server_stop() -> None:
    """Stop the local server; commands go back to Prefect's ephemeral mode."""
    from flows.execution.server import stop_persistent

    server = stop_persistent()
    out.print(f"stopped {server.url}" if server else "no local server was running", highlight=False)
