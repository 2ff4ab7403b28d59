"""Tissue detection on a slide thumbnail (scikit-image): HSV-saturation Otsu, white background and pen marks
excluded, then morphological clean-up and hole filling.

Stained tissue is saturated (pink eosin, purple haematoxylin) and glass is white, so Otsu's threshold on the
saturation of the non-pen pixels separates them; pale grey tissue (an IHC counterstain) is caught by being darker
than glass. Pen marks are saturated too, so they are removed first by hue:
blue and green ink have hues that H&E never takes, black ink is dark. All thresholds live in `TissueParams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .reader import require


@dataclass(frozen=True)
class TissueParams:
    """Thresholds of `tissue_mask`; hues and saturations on skimage's [0, 1] HSV scale, RGB on 0..255."""

    min_saturation: float = 0.05  # the Otsu threshold is never below this (nearly blank slides)
    max_gray: float = 0.85  # darker than this (rgb2gray) is tissue even when unsaturated (IHC counterstain); 0: off
    white_rgb: int = 220  # pixels with every channel above this are glass
    pen_hues: Tuple[Tuple[float, float], ...] = ((0.20, 0.45), (0.50, 0.70))  # green, blue ink
    pen_min_saturation: float = 0.4  # ink is vivid; haematoxylin-blue nuclei stay below
    black_value: float = 0.15  # darker than this (HSV value) is black ink or debris
    pen_dilation: int = 2  # ink edges blend with tissue: grow the pen mask by this many pixels
    min_object_fraction: float = 0.0005  # tissue islands smaller than this fraction of the thumbnail are dropped
    closing_radius: int = 2
    max_hole_fraction: float = 0.01  # holes up to this fraction of the thumbnail are filled


def pen_mask(hsv: np.ndarray, params: TissueParams) -> np.ndarray:
    """(h, w) bool: blue/green ink (hue in ``pen_hues`` and saturated) or black ink (dark), grown a little."""
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = np.zeros(hue.shape, bool)
    for low, high in params.pen_hues:
        coloured |= (hue >= low) & (hue <= high)
    pen = (coloured & (sat >= params.pen_min_saturation)) | (val < params.black_value)
    if params.pen_dilation > 0:
        morphology = require("skimage.morphology")
        pen = morphology.dilation(pen, morphology.disk(params.pen_dilation))
    return pen


def tissue_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """(h, w, 3) uint8 thumbnail -> (h, w) bool tissue mask."""
    color = require("skimage.color")
    filters = require("skimage.filters")
    hsv = color.rgb2hsv(rgb)
    pen = pen_mask(hsv, params)
    white = np.all(rgb > params.white_rgb, axis=-1)
    sat = hsv[..., 1]
    candidates = sat[~pen]
    threshold = params.min_saturation
    if candidates.size and np.ptp(candidates) > 0:
        threshold = max(threshold, float(filters.threshold_otsu(candidates)))
    dark = color.rgb2gray(rgb) < params.max_gray
    mask = ((sat > threshold) | dark) & ~white & ~pen
    return clean_mask(mask, params) & ~pen  # filling may close over ink lying on tissue: take it out again


def clean_mask(mask: np.ndarray, params: TissueParams) -> np.ndarray:
    """Closing (bridges stain gaps), small islands removed, small holes filled."""
    morphology = require("skimage.morphology")
    if params.closing_radius > 0:
        mask = morphology.closing(mask, morphology.disk(params.closing_radius))
    mask = drop_small_components(mask, params.min_object_fraction * mask.size)
    return ~drop_small_components(~mask, params.max_hole_fraction * mask.size)


def drop_small_components(mask: np.ndarray, max_area: float) -> np.ndarray:
    """``mask`` without its 8-connected components of at most ``max_area`` pixels (the same on every
    scikit-image version, whose remove_small_* keywords changed in 0.26)."""
    measure = require("skimage.measure")
    labels = measure.label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_area
    small[0] = False  # label 0 is outside the mask
    return mask & ~small[labels]
