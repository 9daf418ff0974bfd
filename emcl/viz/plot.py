"""The one plotting module: matplotlib through the Agg canvas (no display, no pyplot global state), one
style for every figure, PNGs written atomically (:func:`emcl.fileio.save_bytes`).

    fig, axes = figure(1, 2, size=(10, 4.5))
    axes[0].plot(...)
    save_png(fig, "runs/demo/curves.png")
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rc_context, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emcl.fileio import save_bytes

#: Colours used for the two modalities in every figure (colour-blind safe pair), and for marks.
TEXT_COLOR = "#d95f02"
VIDEO_COLOR = "#1b9e77"
GT_COLOR = "#1a9641"
MISS_COLOR = "#bbbbbb"
LINE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "image.interpolation": "nearest",
}


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None,
           **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    """A figure with the project style and an (nrows, ncols) array of axes (always a 2-D array)."""
    with rc_context(STYLE):
        fig = Figure(figsize=size or (4.0 * ncols, 3.2 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def png_bytes(fig: Figure, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes (no metadata timestamps, so the same figure gives the same bytes)."""
    buf = io.BytesIO()
    with rc_context(STYLE):
        fig.savefig(buf, format="png", dpi=dpi or rcParams["savefig.dpi"], metadata={"Software": None})
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (temporary file, then rename); returns the path."""
    return save_bytes(png_bytes(fig, dpi), path)


def image_png_bytes(img: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (for thumbnails embedded in HTML pages)."""
    h, w = img.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.figimage(img, resize=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
