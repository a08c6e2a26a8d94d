"""What the stages run on: the device (``auto`` means CUDA when torch sees one) and library versions."""
from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
