"""Regenerate the measured tables of the README and docs/ from real runs of the commands they describe.

Each table sits between two markers in its page (``SECTIONS`` says which)::

    <!-- readme:demo -->
    | ... the table ... |
    <!-- /readme:demo -->

and comes from one command (``SECTIONS``), run here as a subprocess in a fresh
cache and Prefect home, whose markdown table replaces what the markers hold.
After bumping a dependency: ``bash .ci/lock``, then this script, then commit
both (``tests/test_readme.py`` checks the demo's table against a real run).

    python -m benchmarks.readme [--only demo imagenet cli export heads kernels demo-kernels] [--check]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PERFORMANCE = REPO / "docs" / "performance.md"
TP = [sys.executable, "-m", "flows.cli"]

#: section name -> the command whose markdown table it holds (``{cache}``: a fresh cache folder)
SECTIONS: dict[str, list[str]] = {
    "demo": [*TP, "demo", "--markdown", "--cache-dir", "{cache}"],
    "imagenet": [*TP, "demo", "--imagenet", "--markdown", "--cache-dir", "{cache}"],
    "cli": [sys.executable, "-m", "benchmarks.cli", "--markdown"],
    "export": [sys.executable, "-m", "benchmarks.export"],
    "heads": [sys.executable, "-m", "benchmarks.heads", "--markdown"],
    "kernels": [sys.executable, "-m", "benchmarks.kernels"],
    "demo-kernels": [sys.executable, "-m", "benchmarks.demo_kernels"],
}
#: the page that holds each section's table
PAGES: dict[str, Path] = {"demo": README, "imagenet": PERFORMANCE, "cli": PERFORMANCE, "export": PERFORMANCE,
                          "heads": PERFORMANCE, "kernels": PERFORMANCE, "demo-kernels": PERFORMANCE}


def page(name: str) -> Path:
    return PAGES[name]


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- readme:{name} -->\n)(.*?)(<!-- /readme:{name} -->)", re.S)


def section(text: str, name: str) -> str:
    """The table the README holds for ``name`` (a missing marker is an error naming it)."""
    found = _pattern(name).search(text)
    if found is None:
        raise ValueError(f"{PAGES.get(name, README).relative_to(REPO)} has no <!-- readme:{name} --> ... "
                         f"<!-- /readme:{name} --> block")
    return found.group(2)


def table(stdout: str) -> str:
    """The markdown tables in a command's output: its lines that start with ``|``, each table after its
    ``**caption**`` line when it has one (then separated by blank lines)."""
    kept = [line for line in stdout.splitlines() if line.startswith(("|", "**"))]
    out = []
    for line in kept:
        if line.startswith("**"):
            out += ([""] if out else []) + [line, ""]
        else:
            out.append(line)
    return "".join(line + "\n" for line in out)


def measure(name: str, workdir: Path) -> str:
    """Run the section's command in a fresh cache and Prefect home; its markdown table."""
    return table(run(name, workdir))


def run(name: str, workdir: Path) -> str:
    """The section's command, run in a fresh cache and Prefect home (no PREFECT_ or TRANSFERPIPE_ setting of
    this process's): its stdout, which holds a markdown table."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRANSFERPIPE_"))}
    env.update(PREFECT_HOME=str(workdir / "prefect"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    args = [a.replace("{cache}", str(workdir / "cache")) for a in SECTIONS[name]]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if not table(done.stdout):
        raise SystemExit(f"{' '.join(args)} printed no markdown table:\n{done.stdout[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--check", action="store_true", help="only say which tables differ; exit 1 if any does")
    args = parser.parse_args()
    texts = {path: path.read_text() for path in {page(name) for name in args.only}}
    stale = []
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{name}: {' '.join(SECTIONS[name])}", flush=True)
            new = measure(name, Path(tmp))
        text = texts[page(name)]
        if new != section(text, name):
            stale.append(name)
            texts[page(name)] = _pattern(name).sub(lambda m: m.group(1) + new + m.group(3), text)
        print(new, flush=True)
    if args.check:
        print(f"differ from the pages: {', '.join(stale) or 'none'}")
        raise SystemExit(1 if stale else 0)
    for path, text in texts.items():
        path.write_text(text)
    print(f"{', '.join(f'{n} ({page(n).relative_to(REPO)})' for n in stale) or 'nothing'} updated")


if __name__ == "__main__":
    main()
