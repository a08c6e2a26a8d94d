"""Contact sheets: the images behind each finding as one PNG (matplotlib, Agg), read through the dataset
source, so folders, shards and tables all draw: near-duplicate pairs side by side, label-issue candidates
with their given and predicted class, outliers with their score."""
from __future__ import annotations

from pathlib import Path

from tasks.data.manifest import Manifest

THUMB = 64  # pixels a thumbnail is drawn at


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
        pictures = [np.asarray(manifest.image(item).convert("RGB").resize((THUMB, THUMB))) for item in items]
        gap = np.full((THUMB, 4, 3), 255, dtype=np.uint8)
        ax.imshow(np.concatenate([p for pic in pictures for p in (pic, gap)][:-1], axis=1))
        ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
