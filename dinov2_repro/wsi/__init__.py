"""Whole-slide images (histopathology): reading, tissue detection and tiling.

  reader  - `open_slide`: openslide (openslide-bin wheel) with tiffslide as the fallback, one small adapter
  levels  - `choose_level`: the pyramid level for a target mpp or magnification
  tissue  - `tissue_mask`: HSV-saturation Otsu, white glass and pen ink excluded, clean-up, hole filling
  grid    - the tile grid and each tile's tissue fraction
  tiler   - `tile_slides`: coordinates CSV + thumbnail per slide, resumable, parallel across slides
  tiles   - `WsiTileDataset` (``data.kind: wsi_tiles``): tiles read from the slides on access; `export_tiles`
  slide_eval - `evaluate_slides`: attention-MIL on slide labels over tile embeddings, label fractions, heatmaps
  cli     - ``dinov2-repro wsi tile``, ``wsi export`` and ``wsi eval``

The readers and scikit-image come with ``pip install dinov2_repro[wsi]`` and are imported only when used.
"""

from .levels import LevelChoice, ResolutionError, choose_level
from .reader import Slide, SlideReadError, open_slide
from .tiler import TileOptions, tile_slide, tile_slides
from .tissue import TissueParams, tissue_mask

__all__ = ["LevelChoice", "ResolutionError", "Slide", "SlideReadError", "TileOptions", "TissueParams",
           "choose_level", "open_slide", "tile_slide", "tile_slides", "tissue_mask"]
