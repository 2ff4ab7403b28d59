"""One small adapter over the whole-slide readers: openslide (through the ``openslide-bin`` wheel, no system library)
first, tiffslide for the TIFF-based files openslide refuses.

`open_slide(path)` -> `Slide`: level count, dimensions and downsamples, microns per pixel (``openslide.mpp-x`` or
``tiffslide.mpp-x``), objective power, ``read_region`` at level-0 coordinates as a uint8 (H, W, 3) RGB array
(transparent pixels composited on white) and a thumbnail. The readers are imported lazily: without them the
error names ``pip install dinov2_repro[wsi]``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

BACKENDS = ("openslide", "tiffslide")
EXTRA_HINT = "pip install dinov2_repro[wsi]"


class SlideReadError(RuntimeError):
    """A slide that no available reader can open (corrupt, truncated or of an unsupported format)."""


def require(module: str):
    """``import module``, or an ImportError naming the ``[wsi]`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"whole-slide images need {module!r} ({exc}): {EXTRA_HINT}") from exc


def available_backends() -> Tuple[str, ...]:
    """The readers that import here, in order of preference."""
    found = []
    for name in BACKENDS:
        try:
            importlib.import_module(name)
            found.append(name)
        except ImportError:
            continue
    return tuple(found)


def _float_property(properties, *keys) -> Optional[float]:
    for key in keys:
        value = properties.get(key)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


@dataclass
class Slide:
    """An open slide; ``handle`` is the openslide or tiffslide object behind it."""

    path: str
    backend: str
    handle: object

    @property
    def level_count(self) -> int:
        return int(self.handle.level_count)

    @property
    def level_dimensions(self) -> Tuple[Tuple[int, int], ...]:
        """(width, height) of each level, finest first."""
        return tuple((int(w), int(h)) for w, h in self.handle.level_dimensions)

    @property
    def level_downsamples(self) -> Tuple[float, ...]:
        return tuple(float(d) for d in self.handle.level_downsamples)

    @property
    def mpp(self) -> Optional[float]:
        """Microns per level-0 pixel (x), None when the file does not say."""
        return _float_property(self.handle.properties, f"{self.backend}.mpp-x", "openslide.mpp-x", "tiffslide.mpp-x")

    @property
    def objective_power(self) -> Optional[float]:
        return _float_property(self.handle.properties, f"{self.backend}.objective-power",
                               "openslide.objective-power", "tiffslide.objective-power")

    def read_region(self, x: int, y: int, level: int, size: Tuple[int, int]) -> np.ndarray:
        """uint8 (h, w, 3) RGB of ``size`` = (w, h) pixels of ``level`` whose top left is level-0 (x, y)."""
        region = self.handle.read_region((int(x), int(y)), int(level), (int(size[0]), int(size[1])))
        return rgba_on_white(np.asarray(region))

    def thumbnail(self, max_side: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the whole slide, its longer side ``max_side`` at most (aspect kept)."""
        return rgba_on_white(np.asarray(self.handle.get_thumbnail((int(max_side), int(max_side)))))

    def close(self) -> None:
        self.handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rgba_on_white(array: np.ndarray) -> np.ndarray:
    """(h, w, 3|4) -> uint8 (h, w, 3): alpha (outside the scanned area) composited on white, as glass looks."""
    if array.ndim == 3 and array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        rgb = array[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def _open_with(backend: str, path: str):
    module = importlib.import_module(backend)
    return module.OpenSlide(path) if backend == "openslide" else module.TiffSlide(path)


def open_slide(path: os.PathLike | str, backend: str = "auto") -> Slide:
    """The slide at ``path`` read by ``backend`` ("auto": openslide, then tiffslide when openslide refuses it).

    Raises SlideReadError naming the file and each reader's reason when none can open it."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"slide not found: {path}")
    if backend == "auto":
        order = available_backends()
        if not order:
            raise ImportError(f"whole-slide images need openslide-python (+ openslide-bin) or tiffslide: {EXTRA_HINT}")
    elif backend in BACKENDS:
        require(backend)
        order = (backend,)
    else:
        raise ValueError(f"slide reader {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    reasons = []
    for name in order:
        try:
            return Slide(path, name, _open_with(name, path))
        except Exception as exc:  # each reader has its own error types; the next one may read the file
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).strip() or 'unreadable'}")
    raise SlideReadError(f"{path}: no reader can open it ({'; '.join(reasons)})")
