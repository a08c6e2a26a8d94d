"""Device choice shared by every stage: ``auto`` means CUDA when torch sees one."""
from __future__ import annotations

import torch


def pick_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} is requested but torch sees no CUDA device; use auto or cpu")
    return device
