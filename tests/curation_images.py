"""Test-made images for the curation tests: distinct pictures of coloured rectangles on a coloured background."""

from __future__ import annotations

import numpy as np
from PIL import Image


def shapes_image(seed: int, size: int = 64, rectangles: int = 4) -> Image.Image:
    """A distinct RGB test image: ``rectangles`` coloured rectangles on a coloured background, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(rectangles):
        x, y = rng.integers(0, size - 16, 2)
        w, h = rng.integers(8, 32, 2)
        pixels[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)
