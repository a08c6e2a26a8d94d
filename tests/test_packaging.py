"""A wheel holds every module of the three layers (a hand-written package list once dropped the subpackages of
tasks/), and an installed wheel imports and plans without the source tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_holds_every_module_and_imports_without_the_source_tree(tmp_path):
    # built from a copy of the tracked files: a build/ folder left in the checkout would hide a missing package
    tree = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("transferpipe-*.whl"))
    sources = {p.relative_to(REPO).as_posix() for layer in ("flows", "tasks", "storage")
               for p in (REPO / layer).rglob("*.py")}
    assert sources - set(zipfile.ZipFile(wheel).namelist()) == set()

    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=1800)
    assert installed.returncode == 0, installed.stderr
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "import tasks.heads.stage, tasks.data, flows.cli, flows.planning.nodes\n"
              "from tasks.heads import load_head\n"
              "from tasks.data import DataConfig\n"
              "assert tasks.heads.stage.__file__.startswith(sys.argv[1]), tasks.heads.stage.__file__\n"
              "assert sorted(tasks.data.SOURCES) == ['csv', 'digits', 'files', 'imagefolder', 'mnist5k', 'table', "
              "'webdataset']\n"
              "import tasks.stages; assert 'predict' in {s.name for s in tasks.stages.STAGES}\n")
    ran = subprocess.run([sys.executable, "-c", script, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)
    assert ran.returncode == 0, ran.stderr
