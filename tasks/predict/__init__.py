"""Predictions on new images: the chosen model applied to images that arrive after the run, with calibrated
probabilities, conformal prediction sets and out-of-distribution flags.

Owns: the ``predict:`` config and plan (``plan``), the trust computations (``trust``: temperature, conformal
sets, kNN OOD score) and the stage (``stage``) that writes ``predictions/<key>/predictions.parquet``.
May import: data, backbones, extract (the new images' features), heads (the model), evaluate (its pick).
"""
