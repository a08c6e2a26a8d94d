"""A map of the embedding space: each split's cached features in 2-D, coloured by class, in every report.

The projection is fitted on a sample of the train split (PCA by default; UMAP with ``umap-learn`` installed) and
applied to every split, so the panels share axes. At most ``points`` rows per split are drawn (a seeded sample,
the same on every run); at more than 20 classes only the 20 largest get colours (the rest are grey), so a map
of 1,000 classes stays readable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

COLOURED = 20


class MapConfig(BaseModel):
    """``evaluate.embedding_map``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["pca", "umap", "none"] = Field("pca", description="umap needs pip install 'transferpipe[umap]'")
    points: int = Field(20000, ge=100, le=1_000_000, description="rows drawn per split at most (a seeded sample)")
    layer: str = "penultimate"


def check_method(method: str) -> None:
    """UMAP is an extra: say how to get it before anything computes."""
    import importlib.util

    if method == "umap" and importlib.util.find_spec("umap") is None:
        raise ValueError("evaluate.embedding_map.method: umap needs umap-learn: pip install 'transferpipe[umap]' "
                         "(or use pca)")


def sample(n: int, points: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded sample of ``min(n, points)`` rows."""
    if n <= points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, points, replace=False))


def project(train: np.ndarray, others: list[np.ndarray], method: str, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """2-D coordinates of the train sample and of each other split, by a projection fitted on the train sample."""
    X = np.asarray(train, dtype=np.float32)
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, max(2, len(X) - 1)), n_jobs=1)
        return [reducer.fit_transform(X), *(reducer.transform(np.asarray(o, np.float32)) for o in others)], "UMAP"
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, svd_solver="randomized" if min(X.shape) > 50 else "full", random_state=seed).fit(X)
    share = pca.explained_variance_ratio_.sum()
    return [pca.transform(X), *(pca.transform(np.asarray(o, np.float32)) for o in others)], \
        f"PCA ({share:.0%} of the variance)"


def draw(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], method: str,
         title: str) -> dict[str, Any]:
    """One panel per split; ``splits``: ``{name: (features of the sampled rows, their labels)}``, train first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(splits)
    coords, how = project(splits[names[0]][0], [splits[n][0] for n in names[1:]], method)
    counts = np.bincount(splits[names[0]][1], minlength=len(classes))
    shown = [int(c) for c in np.argsort(-counts, kind="stable")[:COLOURED] if counts[c]]
    palette = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name, xy in zip(axes[0], names, coords):
        y = splits[name][1]
        size = float(np.clip(6000 / max(len(y), 1), 2, 14))  # small samples get larger dots
        grey = ~np.isin(y, shown)
        ax.scatter(xy[grey, 0], xy[grey, 1], s=size * 0.7, c="#cccccc", linewidths=0, rasterized=True)
        for colour, c in enumerate(shown):
            at = y == c
            ax.scatter(xy[at, 0], xy[at, 1], s=size, color=palette(colour % 20), linewidths=0, rasterized=True,
                       label=str(classes[c]))
        ax.set(title=f"{name} ({len(y)} points)", xticks=[], yticks=[])
    extra = f"; the {len(shown)} largest of {len(classes)} classes coloured" if len(classes) > len(shown) else ""
    fig.suptitle(f"{title}: {how}{extra}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, markerscale=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.88, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"method": how, "points": {n: int(len(splits[n][1])) for n in names}, "coloured_classes": len(shown)}
