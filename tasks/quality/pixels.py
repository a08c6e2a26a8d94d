"""Near-duplicates by pixels (``quality.pixels: true``): a 64-bit perceptual hash of every image, read once
through its dataset source, and the pairs whose hashes differ in at most :data:`MAX_BITS` bits.

Features can move a faintly re-encoded copy far from its original (ImageNet features put a copy with pixel
noise at a centred cosine of 0.75, below distinct digits at 0.97); the perceptual hash (the 8 x 8 lowest
frequencies of a 32 x 32 grey thumbnail's DCT, each above or below their median) does not move. A
difference hash (is each pixel brighter than its neighbour) was tried first: on digits' black backgrounds
faint noise flips its bits at random, and it paired 26,546 train-test images. The comparison is all pairs of 64-bit hashes
(blocks of rows, never a rows x rows matrix held), so it is meant for splits up to :data:`PIXEL_ROWS` images;
above, the findings say it was left out.
"""
from __future__ import annotations

import numpy as np

MAX_BITS = 0  # hash bits two images may differ in and still be near-duplicates by pixels (measured: docs)
PIXEL_ROWS = 200_000
BLOCK = 1024  # query hashes compared at once
CHUNK = 8192  # against this many gallery hashes (1024 x 8192 x 8 bytes: 64 MB a step)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def phash(image) -> int:
    """The perceptual hash of a PIL image: of the 32 x 32 grey thumbnail's orthonormal DCT, the 8 x 8 lowest
    frequencies, one bit each for whether it is above their median (the constant term left out of the median)."""
    from PIL import Image
    from scipy.fft import dctn

    small = np.asarray(image.convert("L").resize((32, 32), Image.BOX), dtype=np.float64)
    low = dctn(small, norm="ortho")[:8, :8].ravel()
    return int(np.packbits(low > np.median(low[1:])).view(">u8")[0])


def hashes(read, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every id's hash (uint64) via ``read(id) -> PIL image``, and a mask of those that could not be read."""
    out, unreadable = np.zeros(len(ids), dtype=np.uint64), np.zeros(len(ids), dtype=bool)
    for i, item in enumerate(ids):
        try:
            out[i] = phash(read(item))
        except (OSError, ValueError):  # moved, deleted or undecodable since extraction: no pixel finding
            unreadable[i] = True
    return out, unreadable


def _bits(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (a byte table: numpy's bitwise_count needs numpy 2)."""
    return _POPCOUNT[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def close_pairs(queries: np.ndarray, gallery: np.ndarray | None, max_bits: int = MAX_BITS,
                skip: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``(query row, gallery row, differing bits)`` of every pair within ``max_bits``, closest first;
    ``gallery`` None: within ``queries``, each pair once (lower row first). ``skip``: the unreadable masks of
    the two sides, left out."""
    within = gallery is None
    gallery = queries if within else gallery
    bad_q, bad_g = skip if skip is not None else (np.zeros(len(queries), bool), np.zeros(len(gallery), bool))
    found = []
    for start in range(0, len(queries), BLOCK):
        q = queries[start : start + BLOCK]
        for g0 in range(start if within else 0, len(gallery), CHUNK):  # within: only pairs after the query
            g = gallery[g0 : g0 + CHUNK]
            distance = _bits(q[:, None] ^ g[None, :])
            close = (distance <= max_bits) & ~bad_q[start : start + len(q), None] & ~bad_g[None, g0 : g0 + len(g)]
            if within:
                close &= np.arange(g0, g0 + len(g))[None, :] > np.arange(start, start + len(q))[:, None]
            r, c = np.nonzero(close)
            found.append(np.stack([start + r, g0 + c, distance[r, c].astype(np.int64)], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 3), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0], pairs[:, 2]))] if len(pairs) else pairs
