"""Results as Prefect artifacts: visible on the flow run in the Prefect UI."""
from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.evaluate.plan import EvalResult
from tasks.evaluate.report import summary_rows
from tasks.quality.plan import QualityResult


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for an experiment or sweep name."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "experiment"


def publish_report(experiment: str, evaluation: EvalResult, trust: list[Path] = ()) -> None:
    """The evaluation's report on the run's page, followed by ``trust``: the reports of the predictions the run
    made (how far to trust the served model: calibration, coverage on test, the OOD score), each where its stage
    wrote it."""
    key = artifact_key(experiment)
    report = evaluation.report
    markdown = "\n\n".join([with_pictures_inline(report.read_text(), report.parent),
                             *(path.read_text() for path in trust if path.is_file())])
    create_markdown_artifact(markdown=markdown, key=f"{key}-report",
                             description=f"{experiment}: test results" + (", and how far to trust the served model"
                                                                          if trust else ""))
    create_table_artifact(table=summary_rows(evaluation.models), key=f"{key}-models",
                          description=f"{experiment}: models ranked by top-1")


#: a picture bigger than this is named, not inlined, in an artifact (the UI stores artifacts in its database)
INLINE_BYTES = 1 << 20


def with_pictures_inline(markdown: str, folder: Path) -> str:
    """Every ``![...](name.png)`` of a file in ``folder`` as a data URI: the Prefect UI shows an artifact's text,
    not the files beside it, so a relative link is a broken image there. A picture over :data:`INLINE_BYTES`, or
    gone, becomes a line naming its file instead of a broken image."""
    def inline(match: re.Match) -> str:
        png = folder / match.group(2)
        if not png.is_file():
            return f"*({match.group(1)}: {png} is gone)*"
        if png.stat().st_size > INLINE_BYTES:
            return f"*({match.group(1)}: {png.stat().st_size / 2**20:.1f} MiB, too big to show here: {png})*"
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^()/:]+\.png)\)", inline, markdown)


def publish_quality(experiment: str, quality: QualityResult) -> None:
    """The quality report with its contact sheets, on the run's page in the UI (``<experiment>-quality``)."""
    create_markdown_artifact(markdown=with_pictures_inline(quality.report.read_text(), quality.folder),
                             key=f"{artifact_key(experiment)}-quality",
                             description=f"{experiment}: near-duplicates, leaks, label issues, outliers")


def publish_table(name: str, rows: list[dict], description: str) -> None:
    create_table_artifact(table=rows, key=artifact_key(name), description=description)
