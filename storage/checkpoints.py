"""Fine-tuning checkpoints and weights files on disk: one home for the format, its reader and writer.

A fine-tuning run lives in ``finetune/<key>/`` (:class:`RunFiles`): ``last.pt``
(everything needed to resume), ``best.pt`` (a *transferpipe checkpoint*: the
model's state dict plus a little metadata, usable as another experiment's
``backbone.weights``) and ``result.json``, written last, marking a finished run.

Each checkpoint has a sidecar ``<name>.sha256`` (its size and sha256, written
with it): a truncated file is seen by a stat, a damaged one when it is read,
and either is set aside in ``quarantine/`` so the run starts again instead of
failing on it forever.

Everything is read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. torch is imported when a
file is read or written, not when this module is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.atomic import room_problem, write_json
from storage.keys import file_sha256
from storage.records import StageFiles, read_json, set_aside

CHECKPOINT_FORMAT = "transferpipe-checkpoint"


class WeightsFileError(ValueError):
    """A weights file that cannot be read as a state dict; the message names the file."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that is truncated or does not match its checksum; the message names the file."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def damage(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted from its size alone (a stat), or None."""
    expected = read_json(_sidecar(path))
    if not path.is_file():
        return "missing"
    if isinstance(expected, dict) and path.stat().st_size != expected.get("bytes"):
        return f"damaged: {path.stat().st_size} bytes, {expected.get('bytes')} written"
    return None


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

    def quarantine(self) -> Path:
        return self.folder / "quarantine"

    def finished(self) -> bool:
        return damage(self.best) is None and self.read_result() is not None

    def problems(self) -> list[str]:
        """What is wrong with a run's files as far as a stat can tell (``transferpipe plan`` says it)."""
        return [f"{p.name} {why}: will train again" for p in (self.best, self.last)
                if p.exists() and (why := damage(p))]

    def heal(self) -> None:
        """Before a run resumes: a damaged best.pt sends the whole run back to the start (its last.pt's "best
        so far" names it); a damaged last.pt alone restarts the epochs."""
        if self.best.exists() and (why := damage(self.best)):
            self.discard(f"best.pt {why}")
        elif self.last.exists() and (why := damage(self.last)):
            self.discard(why, only=(self.last,))

    def discard(self, why: str, only: tuple[Path, ...] | None = None) -> None:
        """Set the run's checkpoints and result (or ``only`` these) aside in its ``quarantine/``: the next run
        fine-tunes from the start (or, with ``last.pt`` alone, restarts its epochs)."""
        for path in only or (self.best, self.last, self.result):
            if path.exists():
                set_aside(path, self.quarantine(), why)


def save(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, rename (a reader sees the old file or the new one), then its
    sidecar. A failed write removes its temporary file and says which file and why."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    problem = room_problem(tmp, _tensor_bytes(obj) + (1 << 20))
    if problem is not None:  # torch reports a full disk as "unexpected pos …": say what it is, before writing
        raise OSError(f"cannot write checkpoint {path}: {problem}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write checkpoint {path}: {exc}") from exc
    write_json(_sidecar(path), digest)


def _tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a checkpoint's nested dicts and lists (what ``torch.save`` writes, roughly)."""
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "element_size") else 0


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save` (tensors and plain containers only), checked against its sidecar."""
    import torch

    why = damage(path)
    expected = read_json(_sidecar(path))
    if why is None and isinstance(expected, dict) and file_sha256(path) != expected.get("sha256"):
        why = "damaged: its sha256 differs from the one written with it"
    if why is not None:
        raise CorruptCheckpoint(f"checkpoint {path} is {why}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read: {exc}") from exc


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
