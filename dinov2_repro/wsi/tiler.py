"""Tiling whole slides: per slide a coordinates table of the tissue tiles and a thumbnail with the mask and the kept
grid, resumable per slide and parallel across slides.

For slide ``<id>`` (its file name without the extension) the output folder gets ``<id>.tiles.csv`` (columns
`CSV_COLUMNS`; x, y in level-0 pixels), ``<id>.thumbnail.png`` and, written last, ``<id>.done.json``. A slide whose
marker exists with the same options is skipped; one without it (a killed run) is done again. Nothing is written
beside the slides. A slide that cannot be read is skipped and named; the run goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..files import write_atomic, write_text_atomic
from .grid import overlay, tile_grid, tissue_fractions
from .levels import choose_level, target_downsample
from .reader import open_slide
from .tissue import TissueParams, tissue_mask

CSV_COLUMNS = ("slide_id", "slide", "level", "x", "y", "size", "read_size", "tissue_fraction", "mpp")
TILES_SUFFIX, THUMBNAIL_SUFFIX, DONE_SUFFIX = ".tiles.csv", ".thumbnail.png", ".done.json"


@dataclass(frozen=True)
class TileOptions:
    """What `tile_slide` does; ``mpp`` / ``magnification`` the target (neither: level 0 at the slide's own mpp),
    ``slide_mpp`` overrides a slide's missing or wrong resolution metadata."""

    tile_size: int = 256
    overlap: float = 0.0
    min_tissue: float = 0.6
    mpp: Optional[float] = None
    magnification: Optional[float] = None
    slide_mpp: Optional[float] = None
    thumbnail_size: int = 2048
    reader: str = "auto"
    tissue: TissueParams = field(default_factory=TissueParams)

    def as_dict(self) -> Dict[str, object]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as they read back from JSON


def slide_id(path: os.PathLike | str) -> str:
    """The slide's file name without its extension: the key of its outputs and its group in splits."""
    name = Path(path).name
    return name[: -len(".ome.tiff")] if name.lower().endswith(".ome.tiff") else Path(name).stem


def output_paths(out: os.PathLike | str, sid: str) -> Dict[str, Path]:
    out = Path(out)
    return {"tiles": out / f"{sid}{TILES_SUFFIX}", "thumbnail": out / f"{sid}{THUMBNAIL_SUFFIX}",
            "done": out / f"{sid}{DONE_SUFFIX}"}


def is_done(out: os.PathLike | str, path: str, options: TileOptions) -> bool:
    """True when the slide's completion marker exists and records the same options (and the files it names)."""
    paths = output_paths(out, slide_id(path))
    try:
        marker = json.loads(paths["done"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("options") == options.as_dict() and paths["tiles"].is_file()


def plan_tiles(slide, options: TileOptions) -> Dict[str, object]:
    """The level choice, thumbnail, mask, every grid tile and its tissue fraction for one open slide."""
    slide_mpp = options.slide_mpp or slide.mpp
    downsample, _ = target_downsample(slide_mpp, slide.objective_power, options.mpp, options.magnification,
                                      slide.path)
    choice = choose_level(slide.level_downsamples, downsample, options.tile_size, slide_mpp)
    thumbnail = slide.thumbnail(options.thumbnail_size)
    mask = tissue_mask(thumbnail, options.tissue)
    width, height = slide.level_dimensions[0]
    scale = (mask.shape[1] / width, mask.shape[0] / height)
    coords = tile_grid(width, height, choice.extent, options.overlap)
    fractions = tissue_fractions(mask, coords, choice.extent, scale)
    return {"choice": choice, "thumbnail": thumbnail, "mask": mask, "scale": scale, "coords": coords,
            "fractions": fractions}


def write_tiles_csv(path: Path, slide_path: str, plan: Dict[str, object], keep: np.ndarray) -> None:
    choice = plan["choice"]
    mpp = "" if choice.mpp is None else f"{choice.mpp:.6g}"
    sid = slide_id(slide_path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for (x, y), fraction in zip(plan["coords"][keep], plan["fractions"][keep]):
                writer.writerow([sid, slide_path, choice.level, int(x), int(y), choice.tile_size, choice.read_size,
                                 f"{fraction:.4f}", mpp])

    write_atomic(path, write)


def tile_slide(path: os.PathLike | str, out: os.PathLike | str, options: TileOptions = TileOptions()) -> Dict:
    """Tile one slide into ``out`` (see the module doc). Returns its summary; raises when it cannot be read."""
    from PIL import Image

    start, path = time.perf_counter(), os.path.abspath(str(path))
    paths = output_paths(out, slide_id(path))
    with open_slide(path, options.reader) as slide:
        plan = plan_tiles(slide, options)
        backend = slide.backend
    keep = plan["fractions"] >= options.min_tissue
    write_tiles_csv(paths["tiles"], path, plan, keep)
    picture = overlay(plan["thumbnail"], plan["mask"], plan["coords"][keep], plan["choice"].extent, plan["scale"])
    write_atomic(paths["thumbnail"], lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
    summary = {"slide": path, "slide_id": slide_id(path), "status": "done", "reader": backend,
               "level": plan["choice"].level, "read_size": plan["choice"].read_size, "mpp": plan["choice"].mpp,
               "n_tiles": int(keep.sum()), "n_grid": int(len(keep)), "tissue_fraction": float(plan["mask"].mean()),
               "seconds": round(time.perf_counter() - start, 3)}
    write_text_atomic(paths["done"], json.dumps({**summary, "options": options.as_dict()}, indent=1))
    return summary


def tile_one_safely(path: str, out: str, options: TileOptions) -> Dict:
    """`tile_slide`, or a "failed" summary naming the reason: one bad slide never ends a run."""
    try:
        return tile_slide(path, out, options)
    except Exception as exc:  # corrupt, truncated, unsupported or resolution-less slides alike
        return {"slide": os.path.abspath(path), "slide_id": slide_id(path), "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}"}


def check_inputs(paths: Sequence[str], out: os.PathLike | str) -> None:
    """Distinct slide ids (their outputs would overwrite each other) and an output folder that is not a slide
    folder (the user's slide folders are never written to)."""
    seen: Dict[str, str] = {}
    for path in paths:
        sid = slide_id(path)
        if sid in seen:
            raise ValueError(f"two slides share the id {sid!r}: {seen[sid]} and {path}; rename one")
        seen[sid] = path
    out = Path(out).resolve()
    folders = {Path(p).resolve().parent for p in paths}
    if out in folders:
        raise ValueError(f"--out {out} holds slides: choose a separate output folder (slide folders are not "
                         f"written to)")


def tile_slides(paths: Sequence[os.PathLike | str], out: os.PathLike | str, options: TileOptions = TileOptions(),
                workers: int = 1, progress: bool = True, log=print) -> Dict[str, object]:
    """Tile every slide of ``paths`` into ``out`` with ``workers`` processes; finished slides are skipped.

    Returns {"done": [...], "skipped": [...], "failed": [...]} of per-slide summaries; each failure is logged in
    one line naming the slide."""
    paths = [str(p) for p in paths]
    check_inputs(paths, out)
    Path(out).mkdir(parents=True, exist_ok=True)
    results: Dict[str, List[Dict]] = {"done": [], "skipped": [], "failed": []}
    todo = [p for p in paths if not is_done(out, p, options)]
    results["skipped"] = [{"slide": os.path.abspath(p), "slide_id": slide_id(p), "status": "skipped"}
                          for p in paths if p not in todo]
    for summary in run_pool(todo, str(out), options, workers, progress):
        results[summary["status"]].append(summary)
        if summary["status"] == "failed":
            log(f"skipped slide {summary['slide']}: {summary['reason']}")
    return results


def run_pool(paths: List[str], out: str, options: TileOptions, workers: int, progress: bool):
    """Summaries of `tile_one_safely` over ``paths`` as they finish, in worker processes when ``workers`` > 1."""
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="tiling slides", unit="slide", disable=not progress)
    if workers <= 1 or len(paths) <= 1:
        for path in paths:
            yield tile_one_safely(path, out, options)
            bar.update(1)
    else:
        import multiprocessing

        # spawn: openslide's C library and threads are not fork-safe
        with ProcessPoolExecutor(min(workers, len(paths)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(tile_one_safely, path, out, options): path for path in paths}
            for future in as_completed(futures):
                yield pool_result(future, futures[future])
                bar.update(1)
    bar.close()


def pool_result(future, path: str) -> Dict:
    """The future's summary; a worker killed by a crash in a reader's C code fails its slides instead of the run
    (they have no marker, so the next run tries them again)."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool as exc:
        return {"slide": os.path.abspath(path), "slide_id": slide_id(path), "status": "failed",
                "reason": f"the worker process died ({exc}); run again to retry"}
