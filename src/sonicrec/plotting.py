"""Figures as PNG files: one way to draw and save them, and the analysis report's figures.

:func:`png_figure` is the one place that picks matplotlib's file-only ``Agg`` backend, saves a
figure atomically and closes it; every figure of sonicrec (the analysis report's filter images and
t-SNE map here, the evaluation chart in :mod:`sonicrec.evaluate`) is drawn inside it.

>>> with png_figure("chart.png", dpi=100, figsize=(4, 3)) as (fig, ax):  # doctest: +SKIP
...     ax.plot([0, 1], [1, 0])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sonicrec.io import atomic_path

MAX_COLOURS = 20  # map legend: the most common labels, the rest as "other"


@contextmanager
def png_figure(path: str | Path, *, dpi: int, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """A new figure and its axes (``plt.subplots(**subplots)``) to draw on, saved as a PNG at exit.

    The ``Agg`` backend draws without a display; the PNG is written atomically (nothing at
    ``path`` when drawing fails) and the figure is closed either way.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def label_colours(labels: pd.Series) -> tuple[pd.Series, dict[str, str]]:
    """Labels (n,) with all but the most common ``MAX_COLOURS - 1`` as "other" and missing ones
    as "unknown", and a hex colour for each label, most common first."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    labels = labels.fillna("unknown").astype(str)
    common = labels.value_counts().index.tolist()
    if len(common) > MAX_COLOURS:
        keep = set(common[: MAX_COLOURS - 1])
        labels = labels.where(labels.isin(keep), "other")
        common = [*common[: MAX_COLOURS - 1], "other"]
    palette = colormaps["tab20" if len(common) > 10 else "tab10"]
    return labels, {value: to_hex(palette(i)) for i, value in enumerate(common)}


def filter_mosaic(filters: np.ndarray, *, columns: int | None = None, gap: int = 1) -> np.ndarray:
    """Filters side by side, each scaled to [-1, 1] by its largest |weight|, NaN between them.

    Parameters
    ----------
    filters : (F, n_mels, K)
    columns : filters per row (default: all in one row up to 32)
    gap : NaN columns/rows between neighbouring filters

    Returns
    -------
    (rows * n_mels + (rows - 1) * gap, columns * K + (columns - 1) * gap) float32, highest band on
    top (row 0), filter i at row ``i // columns``, column ``i % columns``.
    """
    n, n_mels, kernel = filters.shape
    columns = min(n, 32) if columns is None else columns
    rows = -(-n // columns)
    out = np.full((rows * (n_mels + gap) - gap, columns * (kernel + gap) - gap), np.nan, np.float32)
    scale = np.abs(filters).reshape(n, -1).max(axis=1)
    for i in range(n):
        r, c = divmod(i, columns)
        w = filters[i] / scale[i] if scale[i] > 0 else filters[i]
        top, left = r * (n_mels + gap), c * (kernel + gap)
        out[top : top + n_mels, left : left + kernel] = w[::-1]
    return out


def plot_filters(filters: np.ndarray, path: str | Path, *, columns: int | None = None) -> Path:
    """Save :func:`filter_mosaic` of filters (F, n_mels, K) as a PNG: diverging colours, zero white,
    grey between filters.

    Filters are numbered when they fit in one row; a single filter is drawn without axes.
    """
    from matplotlib import colormaps

    n, n_mels, kernel = filters.shape
    columns = min(n, 32) if columns is None else columns
    rows = -(-n // columns)
    mosaic = filter_mosaic(filters, columns=columns)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.55")
    width = 0.32 * columns + 0.6 if n > 1 else 0.5
    with png_figure(path, dpi=110, figsize=(width, 2.2 * rows + (0.5 if n > 1 else 0))) as (fig, ax):
        ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if n > 1:  # a single filter (a playlist's) is drawn bare
            if rows == 1:
                ax.set_xticks(np.arange(n) * (kernel + 1) + (kernel - 1) / 2)
                ax.set_xticklabels([str(i) for i in range(n)], fontsize=6)
            ax.set_yticks([0, n_mels - 1])
            ax.set_yticklabels(["high", "low"], fontsize=7)
            ax.tick_params(length=0)
        fig.tight_layout(pad=0.2)
    return Path(path)


def plot_latent_map(xy: np.ndarray, labels: pd.Series, path: str | Path, *, title: str) -> Path:
    """Save a 2-D map of songs, points (n, 2) coloured by ``labels`` (n,), as a PNG."""
    labels, colours = label_colours(labels.reset_index(drop=True))
    with png_figure(path, dpi=100, figsize=(8, 6.5)) as (fig, ax):
        for value, colour in colours.items():
            mask = (labels == value).to_numpy()
            ax.scatter(xy[mask, 0], xy[mask, 1], s=12, c=colour, label=f"{value} ({mask.sum()})",
                       linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
    return Path(path)
