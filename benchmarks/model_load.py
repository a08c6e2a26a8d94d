"""Loading a backbone from a weights file, as every extraction (each split, each run) does: the stage's
build against the plain torchvision recipe, same file, same run.

(a) plain: ``torchvision.models.get_model(name)`` (random init), then ``load_state_dict`` of the file;
(b) the stage: ``tasks.backbones.models.build`` of a config naming the file (the architecture on the meta
    device, the file's tensors assigned: no random init to overwrite).

Prints each one's median seconds over ``--repeats`` builds and a/b, and checks that both give the same
features (bit for bit) on a random batch. Not a test: nothing here asserts a time.

    python -m benchmarks.model_load [--model resnet18 --model resnet50 --model vit_b_16] [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from benchmarks import parse_args
from storage.checkpoints import load_weights_file
from tasks.backbones.config import BackboneConfig, resolve
from tasks.backbones.models import build

MODELS = ["resnet18", "resnet50", "vit_b_16"]


def _median_seconds(make, repeats: int) -> tuple[float, torch.nn.Module]:
    times, model = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        model = make()
        times.append(time.perf_counter() - started)
    return statistics.median(times), model


def measure(name: str, folder: Path, repeats: int) -> tuple[float, float, bool]:
    """(plain seconds, stage seconds, same features) for ``name`` with random weights saved to a file."""
    path = folder / f"{name}.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(name).state_dict(), path)

    def plain() -> torch.nn.Module:
        model = torchvision.models.get_model(name)
        model.load_state_dict(load_weights_file(path))
        return model.eval()

    spec = resolve(BackboneConfig(name=name, weights=str(path)), folder / "cache")
    t_plain, reference = _median_seconds(plain, repeats)
    t_stage, extractor = _median_seconds(lambda: build(spec), repeats)
    size = 224 if name.startswith("vit") else 64
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        head = "heads" if name.startswith("vit") else "fc"
        setattr(reference, head, torch.nn.Identity())
        same = torch.equal(reference(x), extractor(x)["penultimate"])
    return t_plain, t_stage, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=MODELS, help=f"torchvision models (default: {MODELS})")
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, {"repeats": 1})
    models = args.model or (["resnet18"] if args.quick else MODELS)
    print(f"building a backbone from a weights file: median of {args.repeats} builds "
          "(ratio: plain torchvision / the stage)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            t_plain, t_stage, same = measure(name, Path(tmp), args.repeats)
            print(f"  {name:10s} plain get_model + load_state_dict {t_plain:6.3f} s   stage build {t_stage:6.3f} s"
                  f"   {t_plain / t_stage:5.2f}x   features {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
