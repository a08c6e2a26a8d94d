"""The CLI answers at once: help, cache ls and results import neither torch nor Prefect."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from typer.testing import CliRunner
from flows.cli import app
runner = CliRunner()
for args in {commands!r}:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
heavy = sorted(m for m in ("torch", "torchvision", "prefect", "sklearn") if m in sys.modules)
print("heavy:", ",".join(heavy))
"""


@pytest.mark.parametrize("commands", [
    [["--help"]],
    [[cmd, "--help"] for cmd in ("extract", "heads", "finetune", "run", "serve", "results", "select", "demo",
                                 "server", "cache")],
    [["cache", "ls", "--cache-dir", "{tmp}"], ["results", "--cache-dir", "{tmp}"], ["cache", "gc", "--cache-dir", "{tmp}"]],
], ids=["help", "help-of-every-command", "cache-and-results"])
def test_fast_commands_import_neither_torch_nor_prefect(commands, tmp_path):
    commands = [[a.replace("{tmp}", str(tmp_path)) for a in args] for args in commands]
    done = subprocess.run([sys.executable, "-c", PROBE.format(commands=commands)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "heavy:", done.stdout
