"""Block-wise (BEiT-style) masking of a patch grid for the iBOT loss (Bao et al. 2022; Zhou et al. 2022).

A mask is grown from axis-aligned rectangles, sampled as the published DINOv2 generator does: a target area
uniform in [min_num_patches, remaining budget] (``min_num_patches`` is only the low end of that range, so a small
remaining budget gives small blocks), an aspect ratio log-uniform in [min_aspect, 1/min_aspect], and sides
strictly shorter than the grid's. A rectangle is kept only if it adds between 1 and the remaining budget of new
patches, so the total never exceeds ``min(requested, max_num_patches)``; after 10 failed attempts the mask stops
short of the request.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

Box = Tuple[int, int, int, int]  # top, left, height, width (in patches)
_ATTEMPTS = 10


class MaskingGenerator:
    """``MaskingGenerator((h, w))(num_masking_patches, rng=None) -> bool array (h, w)``, True = masked.

    ``max_num_patches`` defaults to half the grid. ``rng`` is a ``numpy.random.Generator``; with None a fresh
    unseeded one is used (pass one for reproducible masks).
    """

    def __init__(self, input_size: Union[int, Sequence[int]], max_num_patches: Optional[float] = None,
                 min_num_patches: int = 4, min_aspect: float = 0.3, max_aspect: Optional[float] = None):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"mask grid must be at least 1x1, got {input_size}")
        self.num_patches = self.height * self.width
        self.max_num_patches = int(0.5 * self.num_patches if max_num_patches is None else max_num_patches)
        self.min_num_patches = int(min_num_patches)
        if not 0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must lie in (0, 1], got {min_aspect}")
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}x{self.width}, patches {self.min_num_patches}.."
                f"{self.max_num_patches}, log aspect {tuple(round(v, 3) for v in self.log_aspect_ratio)})")

    def get_shape(self) -> Tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Tuple[int, Optional[Box]]:
        """Try up to 10 random rectangles; mask the first that adds 1..budget new patches."""
        u = rng.random((_ATTEMPTS, 4)).tolist()  # one RNG call for all attempts
        lo, hi = self.log_aspect_ratio
        for u_area, u_aspect, u_top, u_left in u:
            area = self.min_num_patches + (budget - self.min_num_patches) * u_area
            aspect = math.exp(lo + (hi - lo) * u_aspect)
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):  # strict, as the published generator
                continue
            top = int(u_top * (self.height - h + 1))
            left = int(u_left * (self.width - w + 1))
            region = mask[top:top + h, left:left + w]
            added = h * w - int(region.sum())
            if 0 < added <= budget:
                region[...] = True
                return added, (top, left, h, w)
        return 0, None

    def sample_boxes(self, num_masking_patches: int, rng: Optional[np.random.Generator] = None
                     ) -> Tuple[np.ndarray, List[Box]]:
        """The mask and the rectangles it was grown from."""
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros((self.height, self.width), dtype=bool)
        boxes: List[Box] = []
        target = min(int(num_masking_patches), self.max_num_patches)
        count = 0
        while count < target:
            added, box = self._add_block(mask, target - count, rng)
            if added == 0:  # nothing fits the remaining budget: stop slightly under the target, as BEiT does
                break
            count += added
            boxes.append(box)
        return mask, boxes

    def __call__(self, num_masking_patches: int = 0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        return self.sample_boxes(num_masking_patches, rng)[0]
