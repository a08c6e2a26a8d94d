"""An exported model's speed on this CPU: images/s of torch eager (the ``torch.export`` program), onnxruntime
and ``torch.compile`` at batch 1 and 32, as ratios to eager measured in the same run
(``tasks.model_export.speed``, what ``export-model --bench`` prints), and the runtime it recommends.

    python -m benchmarks.export_model [--crop 32] [--seconds 5] [--quick]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import QUICK_DIGITS, parse_args
from tasks.model_export import speed

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=32, help="input size of the resnet18 (32: the digits demo's)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per runtime and batch")
    args = parse_args(parser, {"seconds": 0.3})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = {"name": "bench-export-model", "data": QUICK_DIGITS if args.quick else {"source": "digits"},
               "backbone": {"name": "resnet18", "weights": "none",
                            "preprocess": {"resize": args.crop, "crop": args.crop}},
               "extract": {"num_workers": 0}, "heads": [{"kind": "logistic", "C": [1.0]}], "retries": 0,
               "cache_dir": str(tmp / "cache"), "export_model": {"model": "logistic", "parity_images": 64}}
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {"PREFECT_HOME": str(tmp / "home"), "PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1"}
        done = subprocess.run([sys.executable, "-m", "flows.cli", "export-model", str(config), "--out",
                               str(tmp / "model")], cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"export-model failed:\n{done.stderr[-3000:]}")
        rates = speed.measure(tmp / "model", args.seconds)
    print(f"resnet18 at {args.crop} px + logistic head with its trust, exported; images/s on this CPU "
          "(ratio to torch eager, same run)")
    print("| runtime | batch 1 | batch 32 |\n|---|---|---|")
    for row in speed.rows(rates):
        print(f"| {' | '.join(row)} |")
    print(f"recommended here: {speed.recommend(rates)}")


if __name__ == "__main__":
    main()
