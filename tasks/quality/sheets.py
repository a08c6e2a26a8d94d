"""Contact sheets: the images behind each finding as one PNG (matplotlib, Agg), read through the dataset
source, so folders, shards and tables all draw: near-duplicate pairs side by side, label-issue candidates
with their given and predicted class, outliers with their score. An image that can no longer be read (moved
or deleted since extraction) is drawn as a grey tile (and logged); the findings do not need it."""
from __future__ import annotations

import logging
from pathlib import Path

from tasks.data.manifest import Manifest

THUMB = 64  # pixels a thumbnail is drawn at

log = logging.getLogger("transferpipe.quality")


def thumbnail(manifest: Manifest, item: str):
    """An item as a THUMB x THUMB RGB array, or a grey tile when its source cannot read it."""
    import numpy as np

    try:
        return np.asarray(manifest.image(item).convert("RGB").resize((THUMB, THUMB)))
    except Exception as exc:  # noqa: BLE001 - any unreadable image: the sheet says so and goes on
        log.warning("contact sheet: %s is unreadable (%s); drawn as a grey tile", item, exc)
        return np.full((THUMB, THUMB, 3), 200, dtype=np.uint8)


def draw(path: Path, manifest: Manifest, tiles: list[tuple[list[str], str]], title: str, columns: int = 4) -> Path:
    """``tiles``: per tile, the item ids drawn side by side (one, or a pair) and its caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = max(1, -(-len(tiles) // columns))
    width = max(len(items) for items, _ in tiles) if tiles else 1
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6 * width, rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (items, caption) in zip(axes.ravel(), tiles):
        pictures = [thumbnail(manifest, item) for item in items]
        gap = np.full((THUMB, 4, 3), 255, dtype=np.uint8)
        ax.imshow(np.concatenate([p for pic in pictures for p in (pic, gap)][:-1], axis=1))
        ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
