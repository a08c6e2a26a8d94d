"""The chosen model for other runtimes: the frozen backbone and the head, with the temperature, the conformal
threshold and the OOD detector inside, as ONNX, a ``torch.export`` program and safetensors, with a
``config.json`` in timm's vocabulary and a model card; checked against transferpipe's own predictions.

Owns: the ``export_model:`` config and plan (``plan``), the exported module (``network``, torch), the model card
(``card``) and the stage (``stage``). May import: data, backbones, extract, heads, evaluate, predict.
"""
