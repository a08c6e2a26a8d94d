"""What the stages run on: the device (``auto`` means CUDA when torch sees one), the numeric precision
of its forward passes, how much of a split may be held in memory, and library versions."""
from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MEMORY_ENV = "TRANSFERPIPE_HEADS_MEMORY_GB"


def memory_budget() -> float:
    """Bytes a split may take in memory as float32; above it, heads, retrieval and quality read it in chunks.

    ``$TRANSFERPIPE_HEADS_MEMORY_GB``, else a quarter of the machine's memory.
    """
    value = os.environ.get(MEMORY_ENV)
    if value:
        try:
            return float(value) * 2**30
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={value!r} is not a number of GB") from None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def pick_device(name: str | torch.device) -> torch.device:
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} is requested but torch sees no CUDA device; use auto or cpu")
    return device


def cuda_possible() -> bool:
    """Whether CUDA may be there, without importing torch on a machine with no NVIDIA driver."""
    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return torch.cuda.is_available()


#: what a forward pass computes in: plain float32, or autocast to bfloat16 / float16 (AMP, CUDA only)
PRECISIONS = ("fp32", "bf16", "fp16")


def forward_precision(device: str, amp: bool) -> str:
    """The precision a stage with this ``device`` and ``amp`` setting computes in on this machine.

    It is part of the feature and fine-tune keys: AMP runs only on CUDA, in bf16
    where the GPU supports it, else fp16; everything else is fp32. The device
    type is not in the keys: fp32 on a GPU and on a CPU differ only by
    floating-point rounding (and TF32 convolutions, PyTorch's default on
    Ampere and newer GPUs). No torch import on a machine without an NVIDIA driver.
    """
    if not amp or device == "cpu" or not cuda_possible():
        return "fp32"
    import torch

    if device == "auto" or torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a planned precision (None: plain fp32); refuses AMP planned for a device without it."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise ValueError(f"this run was planned in {precision} autocast (AMP on CUDA) but runs on {device}: "
                         f"its features would not match its key; set extract.amp/finetune.amp: false or use a GPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def versions() -> dict[str, str]:
    """The versions that produced an artifact (stored with feature files and reports); imports nothing heavy."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "h5py", "transferpipe"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "dev" if package == "transferpipe" else "absent"
    return found
