"""Which pyramid level to read for a target resolution, and how much of it makes one tile.

A target is microns per pixel (``--mpp 0.5``) or a magnification (``--magnification 20``; 10 / magnification µm
per pixel, the usual 20x = 0.5 µm convention, or the slide's objective power when it has no mpp). The level whose
mpp is within ``tolerance`` (10%) of the target is read as it is; otherwise the next finer level is read over a
larger square and resized, so that a tile never comes from a coarser level than asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


class ResolutionError(ValueError):
    """The slide's resolution is unknown and no usable target was given."""


@dataclass(frozen=True)
class LevelChoice:
    """``level`` to read; ``read_size`` pixels of it make one ``tile_size`` tile (resized when they differ);
    ``extent`` is the tile's side in level-0 pixels; ``mpp`` the tile's resolution (None: unknown, native)."""

    level: int
    tile_size: int
    read_size: int
    extent: int
    mpp: Optional[float]


def target_downsample(slide_mpp: Optional[float], objective: Optional[float], mpp: Optional[float],
                      magnification: Optional[float], name: str) -> tuple:
    """(downsample from level 0 to the target, target mpp or None) for ``--mpp`` / ``--magnification``."""
    if mpp is not None and magnification is not None:
        raise ValueError("give --mpp or --magnification, not both")
    if mpp is None and magnification is None:
        if slide_mpp is None:
            raise ResolutionError(f"{name}: the slide has no resolution metadata (openslide.mpp-x) and no target "
                                  f"was given: pass --mpp (e.g. 0.5) or --magnification (e.g. 20), and --slide-mpp "
                                  f"with the scanner's microns per pixel")
        return 1.0, slide_mpp
    if mpp is not None and mpp <= 0 or magnification is not None and magnification <= 0:
        raise ValueError(f"the target resolution must be > 0 (mpp={mpp}, magnification={magnification})")
    if slide_mpp is not None:
        target = mpp if mpp is not None else 10.0 / magnification
        return target / slide_mpp, target
    if magnification is not None and objective is not None:
        return objective / magnification, None
    raise ResolutionError(f"{name}: the slide has no resolution metadata (neither openslide.mpp-x nor an objective "
                          f"power), so {'--mpp' if mpp is not None else '--magnification'} cannot be honoured: "
                          f"pass --slide-mpp with the scanner's microns per pixel")


def choose_level(downsamples: Sequence[float], downsample: float, tile_size: int, slide_mpp: Optional[float] = None,
                 tolerance: float = 0.1) -> LevelChoice:
    """The level for a target ``downsample`` (from level 0): one within ``tolerance`` of it (the closest), else the
    coarsest level finer than it, read over ``round(tile_size * downsample / level downsample)`` pixels."""
    errors = [abs(d / downsample - 1.0) for d in downsamples]
    close = [(error, i) for i, error in enumerate(errors) if error <= tolerance]
    if close:
        level = min(close)[1]
        read_size = tile_size
    else:
        finer = [i for i, d in enumerate(downsamples) if d < downsample] or [0]  # finer than level 0: upsample it
        level = max(finer, key=lambda i: downsamples[i])
        read_size = max(1, int(round(tile_size * downsample / downsamples[level])))
    extent = max(1, int(round(read_size * downsamples[level])))
    mpp = None if slide_mpp is None else slide_mpp * downsamples[level] * read_size / tile_size
    return LevelChoice(level, int(tile_size), read_size, extent, mpp)
