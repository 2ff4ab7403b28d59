"""Tiles read straight from the slides at training time (``data.kind: wsi_tiles``), and their export as PNG files.

`WsiTileDataset` reads the coordinates tables that ``dinov2-repro wsi tile`` writes (a folder of ``*.tiles.csv`` or
one table) and decodes each tile on access with ``read_region``, so millions of tile files never need writing.
Its samples are ``<slide>::level=<l>,x=<x>,y=<y>,read=<r>,size=<s>`` (x, y at level 0), so that everything keyed by
paths (skipped files, splits) names the tile; ``groups`` gives each tile's slide id, so that splits keep a slide's
tiles on one side. Open slides are cached per process (each loader worker opens its own handles).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..data.datasets import UNLABELED, ImageFileDataset
from ..files import write_atomic, write_text_atomic
from .reader import open_slide
from .tiler import TILES_SUFFIX

TILE_MARK = "::"


def tile_tables(path: os.PathLike | str) -> List[Path]:
    """The coordinates tables at ``path``: the file itself, or every ``*.tiles.csv`` below the folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"tile coordinates not found: {path} (a folder of *{TILES_SUFFIX} or one table)")
    tables = sorted(p for p in path.rglob(f"*{TILES_SUFFIX}") if not p.name.startswith("."))
    if not tables:
        raise FileNotFoundError(f"no *{TILES_SUFFIX} tables under {path}: write them with dinov2-repro wsi tile")
    return tables


def tile_sample(row: dict) -> str:
    """The sample string of one table row."""
    return (f"{row['slide']}{TILE_MARK}level={row['level']},x={row['x']},y={row['y']},"
            f"read={row['read_size']},size={row['size']}")


def split_tile_sample(sample: str) -> Tuple[str, dict]:
    """``<slide>::level=..,x=..`` -> (slide path, {"level", "x", "y", "read", "size"} as ints)."""
    slide, _, rest = sample.rpartition(TILE_MARK)
    return slide, {key: int(value) for key, value in (part.split("=", 1) for part in rest.split(","))}


def read_table(path: Path) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"slide_id", "slide", "level", "x", "y", "size", "read_size"} - set(rows[0] if rows else {})
    if rows and missing:
        raise ValueError(f"{path}: not a tile coordinates table (missing columns {sorted(missing)})")
    return rows


class SlideHandles:
    """Open slides of this process, the least recently used closed beyond ``capacity``; after a fork (a loader
    worker) the inherited handles are dropped, never shared."""

    def __init__(self, capacity: int = 16, reader: str = "auto"):
        self.capacity, self.reader, self.pid, self.open = int(capacity), reader, os.getpid(), OrderedDict()

    def get(self, path: str):
        if self.pid != os.getpid():
            self.pid, self.open = os.getpid(), OrderedDict()
        if path in self.open:
            self.open.move_to_end(path)
            return self.open[path]
        slide = self.open[path] = open_slide(path, self.reader)
        while len(self.open) > self.capacity:
            self.open.popitem(last=False)[1].close()
        return slide

    def __getstate__(self):  # spawned workers get an empty cache, not handles
        return {"capacity": self.capacity, "reader": self.reader}

    def __setstate__(self, state):
        self.__init__(state["capacity"], state["reader"])


class WsiTileDataset(ImageFileDataset):
    """Every tile of the coordinates tables at ``path`` as uint8 (3, size, size) images, unlabeled."""

    def __init__(self, path: os.PathLike | str, transform: Optional[Callable] = None, reader: str = "auto",
                 max_open_slides: int = 16):
        self.tables = tile_tables(path)
        samples, self.groups = [], []
        for table in self.tables:
            for row in read_table(table):
                samples.append((tile_sample(row), UNLABELED))
                self.groups.append(row["slide_id"])
        if not samples:
            raise ValueError(f"the tile tables at {path} list no tiles (lower --min-tissue?)")
        root = path if Path(path).is_dir() else Path(path).parent
        super().__init__(samples, [], str(root), transform)
        self.handles = SlideHandles(max_open_slides, reader)

    def read_tile(self, index: int) -> torch.Tensor:
        """uint8 (3, size, size) of tile ``index``: ``read`` pixels of its level, resized when they differ."""
        slide_path, t = split_tile_sample(self.samples[index][0])
        pixels = self.handles.get(slide_path).read_region(t["x"], t["y"], t["level"], (t["read"], t["read"]))
        if t["read"] != t["size"]:
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).resize((t["size"], t["size"]), Image.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def load_image(self, index: int):
        try:
            image = self.read_tile(index)
        except Exception as exc:  # a slide moved or damaged since tiling: skip its tiles, say so once
            slide = split_tile_sample(self.samples[index][0])[0]
            if slide not in self._warned:
                self._warned.add(slide)
                warnings.warn(f"skipping tiles of unreadable slide {slide}: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
            return None
        if self.image_format == "pil":
            from PIL import Image

            return Image.fromarray(image.permute(1, 2, 0).numpy())
        return image


def export_tiles(path: os.PathLike | str, out: os.PathLike | str, progress: bool = True) -> dict:
    """PNG files of every tile at ``path`` under ``out/<slide id>/``, plus ``out/tiles.csv`` (path, group) that
    ``data.kind: csv`` reads; files already there are kept (a killed export resumes)."""
    from PIL import Image
    from tqdm import tqdm

    dataset, out = WsiTileDataset(path), Path(out)
    rows, written, failed = [], 0, 0
    for index in tqdm(range(len(dataset)), desc="exporting tiles", unit="tile", disable=not progress):
        _, t = split_tile_sample(dataset.samples[index][0])
        group = dataset.groups[index]
        target = out / group / f"{group}_l{t['level']}_x{t['x']}_y{t['y']}.png"
        if not target.is_file():
            image = dataset.load_image(index)
            if image is None:
                failed += 1
                continue
            write_atomic(target, lambda tmp, a=image: Image.fromarray(a.permute(1, 2, 0).numpy()).save(tmp, "PNG"))
            written += 1
        rows.append((target.relative_to(out).as_posix(), group))
    table = "path,group\n" + "".join(f"{p},{g}\n" for p, g in rows)
    write_text_atomic(out / "tiles.csv", table)
    return {"n_tiles": len(rows), "written": written, "unreadable": failed, "manifest": str(out / "tiles.csv")}
