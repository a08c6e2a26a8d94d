"""Which stages change bits when the CPU's kernels change: emulate other CPUs on this one.

Each configuration runs in its own process with the knobs that select kernels set before torch is imported
(``ATEN_CPU_CAPABILITY``, ``DNNL_MAX_CPU_ISA``, ``MKL_CBWR``, oneDNN off), and computes the same three things
on the same inputs:

- extraction: a random-init resnet18 forward (32 px, batch 64, inference mode, channels_last as the stage runs);
- heads: the logistic probe (the stage's sweep) on fixed features;
- fine-tuning: 30 SGD steps of resnet18 end to end on fixed images (forward + backward + optimizer).

It prints, per configuration and stage, whether the bytes equal the first configuration's and the largest
absolute difference; the table in docs/performance.md ("Reproducibility across CPUs") comes from it.

    python -m benchmarks.kernels [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tasks.machine import KERNEL_PINS, KERNELS_ENV

PINNED = {*KERNEL_PINS["reproducible"], KERNELS_ENV}  # none of this process's settings reach a configuration
CONFIGS: dict[str, dict[str, str]] = {
    "TRANSFERPIPE_KERNELS=reproducible": {"TRANSFERPIPE_KERNELS": "reproducible"},  # the demo's: AVX2, 2 threads
    "the same again (a control)": {"TRANSFERPIPE_KERNELS": "reproducible"},
    "this CPU (defaults)": {},
    "reproducible, 1 thread": {"TRANSFERPIPE_KERNELS": "reproducible", "OMP_NUM_THREADS": "1"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "DNNL_MAX_CPU_ISA=SSE41": {"DNNL_MAX_CPU_ISA": "SSE41"},
    "both": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "oneDNN off": {"TRANSFERPIPE_NO_MKLDNN": "1"},
    "OPENBLAS_CORETYPE=Prescott": {"OPENBLAS_CORETYPE": "Prescott"},  # numpy's BLAS: the heads' kernels
}

CHILD = r"""
from tasks.machine import pin_kernels
pin_kernels()  # as flows/__init__.py does, before numpy and torch load
import hashlib, json, os, sys, warnings
import numpy as np, torch, torchvision
warnings.filterwarnings("ignore")
if os.environ.get("TRANSFERPIPE_NO_MKLDNN"):
    torch.backends.mkldnn.enabled = False
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", sys.argv[2])))
steps = int(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
gen = torch.Generator().manual_seed(0)
x = torch.rand(64, 3, 32, 32, generator=gen)
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last)
with torch.inference_mode():
    feats = torch.flatten(torch.nn.Sequential(*list(model.children())[:-1])(x.to(memory_format=torch.channels_last)), 1)
out["extraction"] = feats.numpy().astype(np.float64).tolist()
from tasks.heads.linear import LogisticHead
rng = np.random.default_rng(0)
X = rng.normal(size=(600, 64)).astype(np.float32); y = (X[:, :4].argmax(1) + (rng.random(600) < 0.1)) % 4
head = LogisticHead(C=(0.01, 0.1, 1.0, 10.0)).fit(X[:400], y[:400], X[400:], y[400:])
out["heads"] = head.predict_proba(X[400:]).astype(np.float64).tolist()
torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10).train()
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
labels = torch.randint(0, 10, (64,), generator=gen)
for _ in range(steps):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), labels).backward()
    opt.step()
out["fine-tuning"] = torch.cat([p.detach().flatten() for p in net.parameters()]).double().numpy()[::97].tolist()
print(json.dumps(out))
"""


def run(env: dict[str, str], steps: int, threads: int) -> dict:
    child_env = {**{k: v for k, v in os.environ.items() if k not in PINNED}, **env}
    done = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(threads)], env=child_env, text=True,
                          capture_output=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 fine-tuning steps, 3 configurations")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    steps = 3 if args.quick else 30
    names = [*list(CONFIGS)[:1], "this CPU (defaults)", "OPENBLAS_CORETYPE=Prescott"] if args.quick else list(CONFIGS)
    results = {name: run(CONFIGS[name], steps, args.threads) for name in names}
    base_name, base = next(iter(results.items()))
    print(f"**kernels: each stage against {base_name} (torch CPU capability {base['capability']}), "
          f"{args.threads} threads, {steps} fine-tuning steps**\n")
    print("| configuration | capability | extraction | heads | fine-tuning |")
    print("|---|---|---|---|---|")
    for name, got in results.items():
        cells = []
        for stage in ("extraction", "heads", "fine-tuning"):
            a, b = np.asarray(base[stage]), np.asarray(got[stage])
            diff = float(np.max(np.abs(a - b)))
            cells.append("same bits" if a.tobytes() == b.tobytes() else f"differs (max {diff:.1e})")
        print(f"| {name} | {got['capability']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
