"""JPEG decoding on the extraction device: ``torchvision.io.decode_jpeg`` on a batch of encoded files
(nvJPEG on CUDA, libjpeg-turbo on the CPU), then the backbone's resize and crop on the same device.

The stage decodes with PIL in DataLoader workers (:class:`tasks.backbones.config.Preprocess`); this path is
what ``benchmarks/gpu.py`` measures against it, and ``tests/test_gpu.py`` checks that it decodes the
same pixels as PIL (within ±1 on CUDA). It is not wired into the stage: its resize runs on tensors,
whose rounding differs from PIL's, so its features would need a key of their own.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's (``torchcodec.decoders.decode_jpeg``,
torch >= 2.11); they still work, so the warning is silenced here. The lent GPU machine has torchvision 0.26
and no TorchCodec; move to TorchCodec once both places have it.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from tasks.backbones.config import Preprocess


def read_files(paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """Each file's bytes as a 1-D uint8 tensor (what ``decode_jpeg`` takes)."""
    from torchvision.io import read_file

    with _deprecated_decoders():
        return [read_file(str(p)) for p in paths]


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Encoded JPEGs → RGB uint8 (3, H, W) tensors on ``device``, decoded as one batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not data:
        return []
    with _deprecated_decoders():
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=torch.device(device)))


def to_batch(images: list[torch.Tensor], pre: Preprocess) -> torch.Tensor:
    """Decoded images of any sizes → one uint8 (B, 3, crop, crop) batch on their device."""
    return torch.stack([pre.on_tensor(img) for img in images])


@contextlib.contextmanager
def _deprecated_decoders():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        yield
