"""95% intervals for test metrics: a percentile bootstrap over test images, and a paired one for differences.

A model's per-image results are kept as ``hits``: for each test image, how many of its few-shot seeds
classified it correctly (0 or 1 for a single fit), packed as base64 bytes in the metrics (one byte an image:
66 KB for a 50,000-image test split). Top-1 is their mean over images divided by the seeds, so an interval
is the spread of that mean over test sets resampled with replacement. Two models scored on the same test
images give a paired interval of their difference, which is much narrower than the two intervals side by
side would suggest: an image that is hard for one is usually hard for the other.

Seeded (the same numbers on every run) and computed in blocks of resamples, so a 50,000-image test split
needs about 40 MB.
"""
from __future__ import annotations

import base64

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
_BLOCK = 100  # resamples drawn at a time


def pack_hits(hits: np.ndarray) -> str:
    """Per-image correct counts (0..255) → base64 text (stored in JSON metrics)."""
    hits = np.asarray(hits)
    if hits.size and (hits.min() < 0 or hits.max() > 255):
        raise ValueError("hits are counts of correct seeds per image, 0..255")
    return base64.b64encode(hits.astype(np.uint8).tobytes()).decode("ascii")


def unpack_hits(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.uint8).astype(np.int64)


def bootstrap_interval(values: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of ``values``' mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, _BLOCK):
        count = min(_BLOCK, resamples - start)
        means[start : start + count] = values[rng.integers(0, len(values), (count, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def top1_interval(hits: np.ndarray, seeds: int) -> tuple[float, float]:
    """Top-1's interval from per-image correct counts out of ``seeds`` fits."""
    return bootstrap_interval(np.asarray(hits) / seeds)


def paired_difference(a_hits: np.ndarray, a_seeds: int, b_hits: np.ndarray, b_seeds: int) -> tuple[float, float, float]:
    """Top-1 of a minus top-1 of b on the same test images, and its paired bootstrap interval."""
    a, b = np.asarray(a_hits) / a_seeds, np.asarray(b_hits) / b_seeds
    if a.shape != b.shape:
        raise ValueError(f"a paired interval needs the same test images: {len(a)} and {len(b)} results")
    lo, hi = bootstrap_interval(a - b)
    return float(np.mean(a - b)), lo, hi
