"""Results as Prefect artifacts: visible on the flow run in the Prefect UI."""
from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.evaluate import EvalResult
from tasks.report import summary_rows


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment or sweep name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "experiment"


def publish_report(experiment: str, evaluation: EvalResult) -> None:
    key = artifact_key(experiment)
    create_markdown_artifact(markdown=evaluation.report.read_text(), key=f"{key}-report",
                             description=f"{experiment}: test results")
    create_table_artifact(table=summary_rows(evaluation.models), key=f"{key}-models",
                          description=f"{experiment}: models ranked by top-1")


def publish_table(name: str, rows: list[dict], description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key(name), description=description)
