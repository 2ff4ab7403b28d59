"""Synthetic whole slides for the wsi tests: pyramidal tiled TIFFs (tifffile) with resolution metadata, textured
pink/purple tissue blobs on white glass and blue/green pen strokes, plus the truth they were drawn from."""

from __future__ import annotations

import numpy as np

GLASS = (244, 244, 246)
BLOBS = ((0.30, 0.35, 0.20, 0.14), (0.68, 0.60, 0.16, 0.22), (0.45, 0.80, 0.10, 0.08))  # cx, cy, rx, ry (fractions)


def draw_slide(width: int, height: int, seed: int = 0):
    """(rgb (H, W, 3) uint8, tissue (H, W) bool, pen (H, W) bool): tissue is what a detector should find (the
    blobs minus the ink lying on them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    blobs = np.zeros((height, width), bool)
    for cx, cy, rx, ry in BLOBS:
        blobs |= ((xx - cx * width) / (rx * width)) ** 2 + ((yy - cy * height) / (ry * height)) ** 2 < 1.0
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS
    rgb[..., :] += rng.integers(0, 4, (height, width, 1), dtype=np.uint8)  # glass is never perfectly flat
    eosin = np.array([225, 140, 185], np.float32) + rng.normal(0, 12, (height, width, 1)).astype(np.float32)
    nuclei = rng.random((height, width)) < 0.04
    eosin[nuclei] = (120, 70, 160)  # haematoxylin-purple nuclei
    rgb[blobs] = np.clip(eosin[blobs], 0, 255).astype(np.uint8)
    pen = np.abs(yy - (0.15 * height + 0.55 * xx * height / width)) < 0.012 * height  # a blue diagonal stroke
    pen &= xx > 0.5 * width
    rgb[pen] = (40, 70, 200)
    green = (np.abs(xx - 0.12 * width) < 0.01 * width) & (yy > 0.55 * height) & (yy < 0.95 * height)
    rgb[green] = (40, 160, 70)
    pen |= green
    return rgb, blobs & ~pen, pen


def pyramid(rgb: np.ndarray, n_levels: int):
    """Levels by 2x decimation (every other pixel), so level k pixel (i, j) is level-0 pixel (i 2^k, j 2^k)."""
    return [rgb[:: 2**k, :: 2**k].copy() for k in range(n_levels)]


def write_slide(path, rgb: np.ndarray, mpp: float | None = 0.25, n_levels: int = 4, tile: int = 256,
                tiled: bool = True):
    """A pyramidal TIFF: each level a tiled page of the main IFD chain (what openslide's generic-tiff reads and
    tiffslide too), with resolution tags in pixels per centimetre when ``mpp`` is given; ``tiled=False`` writes
    strips, which openslide refuses and tiffslide reads. Returns the levels written."""
    import tifffile

    levels = pyramid(rgb, n_levels)
    with tifffile.TiffWriter(str(path)) as writer:
        for k, level in enumerate(levels):
            kwargs = dict(photometric="rgb", subfiletype=0 if k == 0 else 1)
            if tiled:
                kwargs["tile"] = (tile, tile)
            if mpp is not None:
                kwargs.update(resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER")
            writer.write(level, **kwargs)
    return levels


def write_test_slides(folder, rgb: np.ndarray, mpp: float = 0.25):
    """``folder`` with a tiled pyramid (tiled.tif), a stripped one that openslide refuses (stripped.tif) and one
    without resolution tags (nores.tif); returns the levels of the pyramid."""
    levels = write_slide(folder / "tiled.tif", rgb, mpp=mpp)
    write_slide(folder / "stripped.tif", rgb, mpp=mpp, tiled=False)
    write_slide(folder / "nores.tif", rgb, mpp=None)
    return levels


PLANTED = (128, 128, 128, 64)  # x, y, width, height (level-0 pixels) of the planted patch, inside the first blob
PLANTED_RGB = (200, 110, 30)  # a saturated orange-brown (DAB-like): tissue, not ink


def draw_planted_slide(size: int = 512, seed: int = 0, planted: bool = True):
    """`draw_slide` of ``size`` x ``size`` with, when ``planted``, a textured orange-brown patch over `PLANTED`
    (two 64-px tiles at the grid's origin): the "positive" tiles of a slide-level label."""
    rgb = draw_slide(size, size, seed=seed)[0]
    if planted:
        x, y, w, h = PLANTED
        noise = np.random.default_rng(seed + 1000).normal(0, 10, (h, w, 3))
        rgb[y: y + h, x: x + w] = np.clip(np.array(PLANTED_RGB, np.float32) + noise, 0, 255).astype(np.uint8)
    return rgb
