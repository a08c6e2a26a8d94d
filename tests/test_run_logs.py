"""transferpipe's own lines reach each run's logs on the server, however the process started (issue 49)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUN = """
import {first}
import asyncio, logging
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.runtime import flow_run

log = logging.getLogger("transferpipe.stagelike")

@task
def stage():
    log.info("a stage line from a task")

@flow
def pipeline():
    log.info("a stage line from the flow")
    stage()
    return flow_run.id

run_id = pipeline()
from prefect.logging.handlers import APILogHandler
APILogHandler().flush()  # logs go to the server in batches

async def names():
    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [line.name + ": " + line.message for line in logs]

print("\\n".join(asyncio.run(names())))
"""


@pytest.mark.slow  # a subprocess with an ephemeral Prefect server
@pytest.mark.parametrize("first", ["flows", "prefect.main\nimport flows"], ids=["transferpipe-first", "prefect-first"])
def test_stage_lines_are_in_the_runs_logs_even_when_prefect_was_imported_first(first, tmp_path):
    """Prefect reads PREFECT_LOGGING_EXTRA_LOGGERS once, when it sets up logging: a process that imported Prefect
    before transferpipe (a served deployment's runner, `prefect deploy`, a notebook) had only Prefect's lines in
    the run's logs in the UI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # Prefect imported first reads its settings before transferpipe's defaults: its 20 s wait for the ephemeral
    # server is too short on a busy 2-core machine (CI timed out at 20.4 s), and this test is about logs
    env.update(PREFECT_HOME=str(tmp_path / "home"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
    done = subprocess.run([sys.executable, "-c", RUN.format(first=first)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "transferpipe.stagelike: a stage line from the flow" in lines, done.stdout
    assert "transferpipe.stagelike: a stage line from a task" in lines, done.stdout
