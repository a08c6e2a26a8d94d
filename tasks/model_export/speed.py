"""How fast an exported model runs here: images per second of the torch program (eager), onnxruntime and
``torch.compile`` of the program, at batch 1 and 32, measured in one run (the ratios compare; the absolute
numbers depend on the machine and its load). ``export-model --bench`` prints them and recommends the fastest,
never one slower than eager."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.records import ModelFiles

BATCHES = (1, 32)


def _rate(run: Callable[[Any], Any], batch: Any, seconds: float) -> float:
    run(batch)  # warm-up (a compiled program compiles here)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or done < 3:
        run(batch)
        done += 1
    return done * len(batch) / elapsed


def runtimes(folder: Path) -> dict[str, Callable[[Any], Any]]:
    """Each way to run the folder's model on a uint8 torch batch: torch eager (the exported program's module),
    onnxruntime (with ``model.onnx``) and torch.compile (where it compiles)."""
    import torch

    files, found = ModelFiles(folder), {}
    if files.program.is_file():
        program = torch.export.load(str(files.program)).module()
        found["torch eager"] = lambda x: program(x)
        try:
            compiled = torch.compile(program)
            compiled(torch.zeros((1, *_shape(folder)), dtype=torch.uint8))
            found["torch.compile"] = lambda x: compiled(x)
        except Exception:  # noqa: BLE001 - no compiler on this machine: not offered
            pass
    if files.onnx.is_file():
        import onnxruntime as ort

        session = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
        found["onnxruntime"] = lambda x: session.run(None, {"images": x.numpy()})
    return found


def _shape(folder: Path) -> tuple[int, int, int]:
    import json

    return tuple(json.loads(ModelFiles(folder).config.read_text())["input_size"])  # type: ignore[return-value]


def measure(folder: Path, seconds: float = 2.0) -> dict[str, dict[int, float]]:
    """``{runtime: {batch: images per second}}`` on random uint8 images of the model's input size."""
    import torch

    torch.manual_seed(0)
    shape = _shape(folder)
    images = {b: torch.randint(0, 256, (b, *shape), dtype=torch.uint8) for b in BATCHES}
    with torch.inference_mode():
        return {name: {b: _rate(run, images[b], seconds) for b in BATCHES} for name, run in runtimes(folder).items()}


def recommend(rates: dict[str, dict[int, float]]) -> str:
    """The runtime fastest at batch 32 that is not slower than eager at either batch (eager when none is)."""
    eager = rates.get("torch eager")
    fair = [n for n, r in rates.items() if eager is None or all(r[b] >= eager[b] for b in BATCHES)]
    return max(fair or ["torch eager"], key=lambda n: rates.get(n, {}).get(32, 0.0))


def rows(rates: dict[str, dict[int, float]]) -> list[list[str]]:
    eager = rates.get("torch eager") or next(iter(rates.values()))
    return [[name, *(f"{r[b]:,.0f} ({r[b] / eager[b]:.2f}x)" for b in BATCHES)] for name, r in rates.items()]
