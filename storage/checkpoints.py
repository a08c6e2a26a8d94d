"""Fine-tuning checkpoints and weights files on disk: one home for the format, its reader and writer.

A fine-tuning run lives in ``finetune/<key>/`` (:class:`RunFiles`): ``last.pt``
(everything needed to resume), ``best.pt`` (a *transferpipe checkpoint*: the
model's state dict plus a little metadata, usable as another experiment's
``backbone.weights``) and ``result.json``, written last, marking a finished run.

Everything is read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. torch is imported when a
file is read or written, not when this module is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.records import StageFiles

CHECKPOINT_FORMAT = "transferpipe-checkpoint"


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state dict; the message names the file."""


@dataclass(frozen=True)
class RunFiles(StageFiles):
    """The files of one fine-tuning run: its spec and result marker (:class:`StageFiles`) and checkpoints."""

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"

    @property
    def best(self) -> Path:
        return self.folder / "best.pt"

    @property
    def lock(self) -> Path:
        return self.folder / ".lock"

    def finished(self) -> bool:
        return self.best.is_file() and self.read_result() is not None


def save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename: a reader sees the old file or the new one."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save` (tensors and plain containers only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_best(path: Path, state_dict: dict[str, Any], *, backbone: str, classes: str, epoch: int,
              val_accuracy: float) -> None:
    """A transferpipe checkpoint: the model's weights (on the CPU) and what they are."""
    save({"format": CHECKPOINT_FORMAT, "model": {k: v.cpu() for k, v in state_dict.items()}, "backbone": backbone,
          "classes": classes, "epoch": epoch, "val_accuracy": val_accuracy}, path)


def load_weights_file(path: Path) -> dict[str, Any]:
    """A state dict from a plain state dict, a ``{"state_dict": …}`` checkpoint, a transferpipe checkpoint
    or a ``.safetensors`` file; never unpickles arbitrary objects."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad files
        raise WeightsFileError(f"cannot load weights file {path}: {exc}") from exc
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"weights file {path} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}
