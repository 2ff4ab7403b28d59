"""The tile grid over a slide and the tissue fraction of each tile, measured on the thumbnail's tissue mask."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def tile_grid(width: int, height: int, extent: int, overlap: float = 0.0) -> np.ndarray:
    """(n, 2) int64 level-0 top-left (x, y) of the tiles of side ``extent`` that fit inside ``width`` x
    ``height``, row-major; ``overlap`` in [0, 1) is the fraction of a tile shared with its neighbour."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {overlap}")
    stride = max(1, int(round(extent * (1.0 - overlap))))
    xs = np.arange(0, width - extent + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - extent + 1, stride, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_fractions(mask: np.ndarray, coords: np.ndarray, extent: int, scale: Tuple[float, float]) -> np.ndarray:
    """(n,) float: the share of mask pixels inside each tile. ``mask`` (h, w) is the thumbnail's; ``scale`` =
    (mask pixels per level-0 pixel in x, in y). A summed-area table makes each tile O(1)."""
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), np.float64)
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(coords[:, 0] * scale[0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * scale[1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + extent) * scale[0]).astype(np.int64), x0 + 1, w)  # at least one pixel
    y1 = np.clip(np.ceil((coords[:, 1] + extent) * scale[1]).astype(np.int64), y0 + 1, h)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def overlay(thumbnail: np.ndarray, mask: np.ndarray, coords: np.ndarray, extent: int,
            scale: Tuple[float, float]) -> np.ndarray:
    """(h, w, 3) uint8: the thumbnail with the tissue mask tinted green and each kept tile outlined in black (not
    blue: that is a pen colour)."""
    image = thumbnail.astype(np.float32)
    image[mask] = 0.6 * image[mask] + 0.4 * np.array([0, 200, 0], np.float32)
    image = image.astype(np.uint8)
    h, w = mask.shape
    for x, y in coords:
        x0, y0 = min(int(x * scale[0]), w - 1), min(int(y * scale[1]), h - 1)
        x1, y1 = min(int((x + extent) * scale[0]), w - 1), min(int((y + extent) * scale[1]), h - 1)
        image[y0, x0:x1 + 1] = image[y1, x0:x1 + 1] = (0, 0, 0)
        image[y0:y1 + 1, x0] = image[y0:y1 + 1, x1] = (0, 0, 0)
    return image
