"""Results as Prefect artifacts: visible on the flow run in the Prefect UI."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.records import ReportFiles
from tasks.evaluate.plan import EvalResult
from tasks.evaluate.report import summary_rows
from tasks.quality.plan import QualityResult


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment or sweep name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "experiment"


def with_map_inline(markdown: str, folder: Path) -> str:
    """The report with its embedding map as a data URI: the Prefect UI shows an artifact's text, not the files
    beside the report."""
    png = ReportFiles(folder).plot("embedding_map")
    link = f"![embedding_map]({png.name})"
    if link not in markdown or not png.is_file():
        return markdown
    return markdown.replace(link, f"![embedding_map](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})")


def publish_report(experiment: str, evaluation: EvalResult) -> None:
    key = artifact_key(experiment)
    report = evaluation.report
    create_markdown_artifact(markdown=with_map_inline(report.read_text(), report.parent), key=f"{key}-report",
                             description=f"{experiment}: test results")
    create_table_artifact(table=summary_rows(evaluation.models), key=f"{key}-models",
                          description=f"{experiment}: models ranked by top-1")


#: a contact sheet bigger than this stays a file link in the artifact (the UI stores artifacts in its database)
INLINE_BYTES = 1 << 20


def with_pictures_inline(markdown: str, folder: Path) -> str:
    """Every ``![...](name.png)`` of a file in ``folder`` (up to :data:`INLINE_BYTES`) as a data URI."""
    def inline(match: re.Match) -> str:
        png = folder / match.group(2)
        if not png.is_file() or png.stat().st_size > INLINE_BYTES:
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^()/:]+\.png)\)", inline, markdown)


def publish_quality(experiment: str, quality: QualityResult) -> None:
    """The quality report with its contact sheets, on the run's page in the UI (``<experiment>-quality``)."""
    create_markdown_artifact(markdown=with_pictures_inline(quality.report.read_text(), quality.folder),
                             key=f"{artifact_key(experiment)}-quality",
                             description=f"{experiment}: near-duplicates, leaks, label issues, outliers")


def publish_table(name: str, rows: list[dict], description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key(name), description=description)
