"""What a user sees in the Prefect UI, in a real headless Chromium against a real server on a non-default port: the
run page renders (not "Oops. Something went wrong"), its logs hold transferpipe's own lines, and every picture of
the report artifact loads (issue 49). Skips, saying how to get one, where no Chromium is installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from browser import Browser, chromium

REPO = Path(__file__).resolve().parents[1]

PICTURES = "Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))"


@pytest.mark.slow
@pytest.mark.server
def test_the_ui_shows_the_run_its_stage_lines_and_every_picture_of_the_report(tiny_config, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run installs it)")
    from flows.execution.server import start_server, stop_server
    from helpers import write_config

    server, proc = start_server(tmp_path / "home")  # a free port: never Prefect's default 4200
    browser = None
    try:
        config = write_config(tiny_config(heads=[{"kind": "knn", "k": [1]}]), tmp_path / "tiny.yaml")
        ran = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], env=server.env(), cwd=REPO,
                             capture_output=True, text=True, timeout=1800)
        assert ran.returncode == 0, ran.stderr[-3000:]
        (run,) = server.api("POST", "/flow_runs/filter", json={"flows": {"name": {"any_": ["pipeline"]}}})
        (report,) = server.api("POST", "/artifacts/filter", json={"artifacts": {"key": {"any_": ["tiny-report"]}}})
        ui = server.url.removesuffix("/api")
        assert not ui.endswith(":4200")
        browser = Browser(binary)

        browser.open(f"{ui}/runs/flow-run/{run['id']}")
        shown = browser.wait_for("document.body.innerText.includes('features for resnet18') && document.body.innerText")
        browser.screenshot(tmp_path / "run.png")
        assert shown, f"no transferpipe line on the run page: {browser.evaluate('document.body.innerText')[:2000]}"
        assert "Something went wrong" not in shown and "run-tiny" in shown

        browser.open(f"{ui}/artifacts/artifact/{report['id']}")
        loaded = browser.wait_for(f"{PICTURES}.length >= 2 && {PICTURES}.every(i => i.complete) && "
                                  f"{PICTURES}.map(i => i.naturalWidth)")
        browser.screenshot(tmp_path / "report.png")
        assert loaded and all(width > 0 for width in loaded), (loaded, browser.evaluate("document.body.innerText"))
        broken = browser.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0)"
                                  ".map(i => i.src.slice(0, 80))")
        assert broken == [], broken
    finally:
        if browser is not None:
            browser.close()
        stop_server(server, proc)
