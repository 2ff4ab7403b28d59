"""PNG grids of images with overlays: matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch), imported only when a figure is drawn."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class Cell:
    """One panel. image: (H, W, 3) uint8 or float in [0, 1]; heat: (H, W) float drawn over it (colour map, alpha);
    mask: (H, W) bool, outlined; text: a caption under the panel."""

    image: Optional[np.ndarray] = None
    heat: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    text: str = ""


def to_hwc(image: Tensor) -> np.ndarray:
    """(3, H, W) uint8 or float tensor -> (H, W, 3) numpy for imshow."""
    return image.detach().cpu().permute(1, 2, 0).numpy()


def upsampled(maps: Tensor, size) -> np.ndarray:
    """(..., h, w) -> (..., H, W) numpy, nearest neighbour: each patch stays a visible square."""
    flat = maps.detach().float().cpu().reshape(-1, 1, *maps.shape[-2:])
    out = torch.nn.functional.interpolate(flat, size=tuple(size), mode="nearest")
    return out.reshape(*maps.shape[:-2], *size).numpy()


def draw_cell(ax, cell: Cell, alpha: float = 0.55) -> None:
    if cell.image is not None:
        ax.imshow(cell.image, interpolation="nearest")
    if cell.heat is not None:
        ax.imshow(cell.heat, cmap="inferno", alpha=alpha if cell.image is not None else 1.0, interpolation="nearest")
    if cell.mask is not None and cell.mask.any() and not cell.mask.all():
        ax.contour(cell.mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    if cell.text:
        ax.set_xlabel(cell.text, fontsize=6)


def save_grid(rows: Sequence[Sequence[Cell]], path: os.PathLike, column_titles: Sequence[str] = (),
              row_titles: Sequence[str] = (), title: str = "", cell_inches: float = 1.9, dpi: int = 80) -> None:
    """rows x columns of `Cell` panels (a short row leaves its last panels empty) written as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(cell_inches * n_cols + 0.4, cell_inches * n_rows + (0.5 if title else 0.2)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i in range(n_rows):
        for j in range(n_cols):
            if j < len(rows[i]):
                draw_cell(axes[i][j], rows[i][j])
            else:
                axes[i][j].axis("off")
    for j, text in enumerate(column_titles[:n_cols]):
        axes[0][j].set_title(text, fontsize=7)
    for i, text in enumerate(row_titles[:n_rows]):
        axes[i][0].set_ylabel(text if len(text) <= 24 else text[:10] + "..." + text[-11:], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
