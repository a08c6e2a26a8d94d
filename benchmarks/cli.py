"""What a user feels from the shell: every figure is a subprocess, start-up included.

In one run, on the digits config (5 heads): `--help`, `cache ls`, `plan`, a cold run,
warm (all-hit) runs in ephemeral mode and against `transferpipe server`, and a
run with one head changed; as baselines, `python -c "import h5py, sklearn"`,
a trivial Prefect flow in each mode, and a plain script that reads the cached
train/val features with h5py and fits the same logistic grid. Not a test.

    python -m benchmarks.cli [--quick] [--markdown]   # quick: three digit classes, two heads; markdown: the README's table
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import QUICK_DIGITS, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits-resnet18.yaml"
TRIVIAL = "from prefect import flow\n@flow\ndef trivial():\n    return 1\ntrivial()\n"
PLAIN = """
import sys, h5py, numpy as np
from sklearn.linear_model import LogisticRegression
def load(path):
    with h5py.File(path) as fh:
        return fh["features/penultimate"][()].astype(np.float32), fh["labels"][()]
(X, y), (Xv, yv) = load(sys.argv[1]), load(sys.argv[2])
mean, std = X.mean(0), X.std(0) + 1e-6
X, Xv = (X - mean) / std, (Xv - mean) / std
model = LogisticRegression(max_iter=1000, warm_start=True)
best = max((model.set_params(C=c).fit(X, y).score(Xv, yv), c) for c in np.logspace(-6, 6, 13))
"""


OUTPUT: dict[str, str] = {}  # the last command's stdout


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    OUTPUT["last"] = done.stdout
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (the README's)")
    args = parse_args(parser, {})
    quick = args.quick
    tp = [sys.executable, "-m", "flows.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRANSFERPIPE_"))}
        env.update(PREFECT_HOME=f"{tmp}/prefect", TRANSFERPIPE_CACHE_DIR=f"{tmp}/cache", DO_NOT_TRACK="1",
                   # as transferpipe sets it (flows/__init__.py), for the plain Prefect baseline too: a busy machine
                   # took longer than Prefect's default 20 s to start the ephemeral server, and the baseline failed
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
        config = yaml.safe_load(CONFIG.read_text())
        if quick:
            config.update(data=QUICK_DIGITS, heads=config["heads"][:2])
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        changed = {**config, "heads": [config["heads"][0], {**config["heads"][1], "k": [1, 5, 10, 20]}]}  # the kNN grid
        changed_path = Path(tmp) / "changed.yaml"
        changed_path.write_text(yaml.safe_dump(changed))
        trivial = Path(tmp) / "trivial.py"
        trivial.write_text(TRIVIAL)
        rows = [("python -c 'import h5py, sklearn'", timed([sys.executable, "-c", "import h5py, sklearn"], env), None)]
        rows.append(("transferpipe --help", timed(tp + ["--help"], env), 0))
        rows.append(("transferpipe cache ls", timed(tp + ["cache", "ls"], env), 0))
        timed([sys.executable, str(trivial)], env)  # creates the ephemeral database: not part of any figure
        t_trivial = timed([sys.executable, str(trivial)], env)
        rows.append(("trivial Prefect flow, ephemeral", t_trivial, None))
        cold = f"run, cold (extract + {len(config['heads'])} heads + evaluate), ephemeral"
        rows.append((cold, timed(tp + ["run", str(config_path)], env), 3))
        rows.append(("run, warm (all cache hits), ephemeral", timed(tp + ["run", str(config_path)], env), 3))
        rows.append(("plan, warm cache", timed(tp + ["plan", str(config_path)], env), 0))
        feats = sorted(Path(tmp, "cache", "features").glob("*.h5"))
        plain = plain_baseline(feats, env)
        rows.insert(1, ("plain script: h5py read + logistic C grid", plain, None))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t_start = timed(tp + ["server", "start", "--port", str(port)], env)
        try:
            t_trivial_server = timed([sys.executable, str(trivial)],
                                     {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
            rows.append(("transferpipe server start", t_start, None))
            rows.append(("trivial Prefect flow, local server", t_trivial_server, None))
            rows.append(("run, warm (all cache hits), local server", timed(tp + ["run", str(config_path)], env), 9))
            rows.append(("run, one head changed, local server", timed(tp + ["run", str(changed_path)], env), 1))
            fit = float(re.search(r"heads ([0-9.]+)s \(computed\)", OUTPUT["last"]).group(1))
            rows.append(("  of which the changed head's fits (heads stage)", fit, None))
            rows.append(("  the rest: start-up, evaluation, report", rows[-2][1] - fit, None))
        finally:
            timed(tp + ["server", "stop"], env)
    report(rows, {0: rows[0][1], 1: plain, 3: t_trivial, 9: t_trivial_server}, args.markdown)


def report(rows: list[tuple[str, float, int | None]], base: dict[int, float], markdown: bool) -> None:
    """Each row with its ratio to the baseline it names (0: the imports, 1: the plain script, 3 and 9: a trivial
    flow, ephemeral and against a server)."""
    names = {0: "import h5py, sklearn", 1: "plain script", 3: "trivial flow, ephemeral", 9: "trivial flow, server"}
    if markdown:
        print("| command | seconds | ratio to its baseline |\n|---|---|---|")
    else:
        print(f"CLI benchmark (from the shell, start-up included; {os.cpu_count()} cores)")
    for what, seconds, against in rows:
        ratio = f"{seconds / base[against]:5.2f}x {names[against]}" if against in base else ""
        if markdown:
            print(f"| {what.strip()} | {seconds:.2f} | {ratio.strip() or '(baseline)'} |")
        else:
            print(f"  {what:<55} {seconds:7.2f} s   {ratio}")


def plain_baseline(features: list[Path], env: dict[str, str]) -> float:
    """The plain script on the train and val feature files (the two largest splits after test)."""
    import h5py

    by_split = {}
    for path in features:
        with h5py.File(path) as fh:
            by_split[yaml.safe_load(fh.attrs["spec"])["split"]] = path
    return timed([sys.executable, "-c", PLAIN, str(by_split["train"]), str(by_split["val"])], env)


if __name__ == "__main__":
    main()
