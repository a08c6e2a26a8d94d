"""What the stages run on: the device (``auto`` means CUDA when torch sees one) and library versions."""
from __future__ import annotations

import platform
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


def versions() -> dict[str, str]:
    """The versions that produced an artifact (stored with feature files and reports)."""
    from importlib.metadata import PackageNotFoundError, version

    import h5py
    import torch
    import torchvision

    try:
        own = version("transferpipe")
    except PackageNotFoundError:
        own = "dev"
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "h5py": h5py.__version__, "transferpipe": own,
    }
