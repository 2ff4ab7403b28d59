"""Whole-slide images: tissue detection per slide, tiling, and tiles/s read from a pyramidal TIFF (and augmented).

Writes into a temporary folder a pyramidal tiled TIFF built from a real micrograph: scikit-image's
``data.immunohistochemistry()`` (512 x 512 RGB, colon, DAB + haematoxylin), upscaled by ``--upscale`` and tiled
with mirrored copies into three irregular tissue regions on white glass (a little noise), ``--width`` x
``--height`` at level 0, ``--levels`` levels of downsample 4 (box filter), JPEG-compressed 256-px tiles
(``--compression``), resolution tags for ``--slide-mpp`` (0.25 µm per pixel). Then, in one process with one torch
thread:

1. tissue detection: ``Slide.thumbnail(2048)`` and `tissue_mask`, each timed, median over ``--repeats``;
2. `tile_slide` of the whole slide at ``--mpp`` (0.5) with ``--tile-size`` (256) tiles: seconds, tiles kept;
3. tiles/s through `WsiTileDataset.load_image`, per reader (openslide, tiffslide): ``cold`` opens the slide
   again for every tile (the handle cache emptied before each read), ``warm`` reuses the cached handle; the tiles
   are visited once each in a shuffled order;
4. tiles/s read and augmented (warm handle): the ``histology`` preset's multi-crop and, for comparison, the plain
   ``dinov2`` preset, with the config's crops (``configs/ssl_default.yaml``: 2 x 224 + 8 x 96).

The slide file is fresh, so it is in the operating system's page cache: these are decode rates, not disk rates.

  python benchmarks/wsi.py --json-out wsi.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's dinov2_repro, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GLASS = (242, 242, 244)
# cx, cy, rx, ry as fractions of the slide: three tissue sections
REGIONS = ((0.28, 0.40, 0.22, 0.30), (0.70, 0.35, 0.17, 0.22), (0.62, 0.78, 0.20, 0.14))


def tissue_texture(width: int, height: int, upscale: int):
    """uint8 (height, width, 3): the IHC micrograph upscaled, tiled with mirrored copies (no seams)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    source = data.immunohistochemistry()[..., :3]
    side = source.shape[0] * upscale
    block = np.asarray(Image.fromarray(source).resize((side, side), Image.BICUBIC))
    block = np.concatenate([block, block[:, ::-1]], axis=1)  # mirror: edges meet their own reflection
    block = np.concatenate([block, block[::-1]], axis=0)
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
    return np.ascontiguousarray(np.tile(block, reps)[:height, :width])


def tissue_regions(width: int, height: int, seed: int = 0, coarse: int = 8):
    """bool (height, width): irregular ellipses (a radius wobbling with the angle), drawn at 1/``coarse`` scale."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = -(-width // coarse), -(-height // coarse)
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for cx, cy, rx, ry in REGIONS:
        dx, dy = (xx - cx * w) / (rx * w), (yy - cy * h) / (ry * h)
        angle = np.arctan2(dy, dx)
        wobble = 1.0 + sum(a * np.sin(k * angle + p) for k, a, p in
                           zip((3, 5, 7), rng.uniform(0.03, 0.08, 3), rng.uniform(0, 2 * np.pi, 3)))
        mask |= dx ** 2 + dy ** 2 < wobble ** 2
    big = Image.fromarray(mask.astype(np.uint8) * 255).resize((w * coarse, h * coarse), Image.NEAREST)
    return np.asarray(big)[:height, :width] > 0


def make_slide(path: Path, width: int, height: int, levels: int, upscale: int, mpp: float, compression: str):
    """Write the slide; returns the level-0 tissue mask's fraction of the slide and the level sizes."""
    import numpy as np
    import tifffile
    from PIL import Image

    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS
    rgb += np.random.default_rng(1).integers(0, 4, (height, width, 1), dtype=np.uint8)  # glass is never flat
    tissue = tissue_regions(width, height)
    rgb[tissue] = tissue_texture(width, height, upscale)[tissue]
    fraction = float(tissue.mean())
    del tissue
    image, sizes = Image.fromarray(rgb), []
    del rgb
    options = {"compression": "jpeg", "compressionargs": {"level": 90}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(str(path), bigtiff=False) as writer:
        for k in range(levels):
            if k:
                image = image.reduce(4)  # box filter: each level is a 4x downsample of the previous one
            sizes.append(image.size)
            writer.write(np.asarray(image), photometric="rgb", tile=(256, 256), subfiletype=0 if k == 0 else 1,
                         resolution=(1e4 / (mpp * 4 ** k),) * 2, resolutionunit="CENTIMETER", **options)
    return fraction, sizes


def read_rate(dataset, order, cold: bool) -> dict:
    """Tiles/s of ``dataset.load_image`` over ``order``; ``cold`` empties the handle cache before each read."""
    start = time.perf_counter()
    for index in order:
        if cold:
            while dataset.handles.open:
                dataset.handles.open.popitem()[1].close()
        assert dataset.load_image(int(index)) is not None
    seconds = time.perf_counter() - start
    return {"tiles": len(order), "seconds": round(seconds, 3), "tiles_per_s": round(len(order) / seconds, 1)}


def augment_rate(dataset, order, augmentation) -> dict:
    import torch

    augmentation(dataset.load_image(int(order[0])), generator=torch.Generator().manual_seed(0))  # one-off set-up
    start = time.perf_counter()
    for position, index in enumerate(order):
        crops = augmentation(dataset.load_image(int(index)), generator=torch.Generator().manual_seed(position))
        assert crops["global_crops"] and crops["local_crops"]
    seconds = time.perf_counter() - start
    return {"tiles": len(order), "seconds": round(seconds, 3), "tiles_per_s": round(len(order) / seconds, 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--height", type=int, default=6144)
    parser.add_argument("--levels", type=int, default=3, help="pyramid levels, each a 4x downsample")
    parser.add_argument("--upscale", type=int, default=2, help="integer upscale of the 512 px micrograph")
    parser.add_argument("--slide-mpp", type=float, default=0.25, help="µm per level-0 pixel written in the file")
    parser.add_argument("--compression", default="jpeg", choices=("jpeg", "none"))
    parser.add_argument("--mpp", type=float, default=0.5, help="tiling target resolution")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--thumbnail-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="tissue detection repeats (median reported)")
    parser.add_argument("--cold-tiles", type=int, default=32, help="tiles read with a fresh handle each")
    parser.add_argument("--augment-tiles", type=int, default=32, help="tiles read and augmented per preset")
    parser.add_argument("--readers", nargs="+", default=["openslide", "tiffslide"],
                        choices=("openslide", "tiffslide"))
    parser.add_argument("--config", default=None, help="config preset whose crops are used (default: defaults)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import dinov2_repro
    from dinov2_repro.config import load_config
    from dinov2_repro.data.augmentations import build_multicrop_augmentation
    from dinov2_repro.wsi import TileOptions, open_slide, tile_slide, tissue_mask
    from dinov2_repro.wsi.tiles import WsiTileDataset

    torch.set_num_threads(1)  # what one DataLoader worker gets
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = {"config": dict(vars(args), cpu_count=os.cpu_count(), torch=torch.__version__,
                              machine=platform.machine(), python=platform.python_version(),
                              package=os.path.dirname(dinov2_repro.__file__),
                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
               "loadavg_start": load_start}
    with tempfile.TemporaryDirectory() as tmp:
        slide_path = Path(tmp) / "ihc_slide.tif"
        start = time.perf_counter()
        fraction, sizes = make_slide(slide_path, args.width, args.height, args.levels, args.upscale,
                                     args.slide_mpp, args.compression)
        results["slide"] = {"level_sizes": sizes, "tissue_fraction_true": round(fraction, 4),
                            "file_mb": round(slide_path.stat().st_size / 2 ** 20, 1),
                            "write_s": round(time.perf_counter() - start, 2)}

        options = TileOptions(tile_size=args.tile_size, mpp=args.mpp, thumbnail_size=args.thumbnail_size)
        thumb_s, mask_s, found = [], [], None
        for _ in range(args.repeats):
            with open_slide(slide_path) as slide:
                t0 = time.perf_counter()
                thumbnail = slide.thumbnail(args.thumbnail_size)
                t1 = time.perf_counter()
                mask = tissue_mask(thumbnail, options.tissue)
                t2 = time.perf_counter()
            thumb_s.append(t1 - t0)
            mask_s.append(t2 - t1)
            found = float(mask.mean())
        results["tissue"] = {"thumbnail_shape": list(thumbnail.shape[:2]),
                             "thumbnail_s": round(statistics.median(thumb_s), 3),
                             "mask_s": round(statistics.median(mask_s), 3),
                             "total_s": round(statistics.median(a + b for a, b in zip(thumb_s, mask_s)), 3),
                             "tissue_fraction_found": round(found, 4)}

        out = Path(tmp) / "tiles"
        out.mkdir()
        start = time.perf_counter()
        summary = tile_slide(slide_path, out, options)
        tiling_s = time.perf_counter() - start
        results["tiling"] = {"seconds": round(tiling_s, 2), "tiles_kept": summary["n_tiles"],
                             "grid_tiles": summary["n_grid"], "level": summary["level"],
                             "read_size": summary["read_size"], "reader": summary["reader"],
                             "tissue_fraction": round(summary["tissue_fraction"], 4)}

        rng = np.random.default_rng(0)
        reads, first_tiles = {}, {}
        for reader in args.readers:
            dataset = WsiTileDataset(out, reader=reader)
            order = rng.permutation(len(dataset))
            first_tiles[reader] = dataset.load_image(0).numpy()
            reads[reader] = {"cold": read_rate(dataset, order[: args.cold_tiles], cold=True),
                             "warm": read_rate(dataset, order, cold=False)}
            reads[reader]["backend"] = next(iter(dataset.handles.open.values())).backend
        results["read"] = reads
        if len(first_tiles) == 2:
            a, b = (first_tiles[r].astype(np.int16) for r in args.readers)
            results["readers_max_abs_diff"] = int(np.abs(a - b).max())

        augmented = {}
        dataset = WsiTileDataset(out, reader=args.readers[0])
        order = rng.permutation(len(dataset))[: args.augment_tiles]
        crops = None
        for preset in ("histology", "dinov2"):
            cfg = load_config(args.config, [f"data.augmentation={preset}"])
            crops = (f"2 x {int(cfg.crops.global_crops_size)} + {int(cfg.crops.local_crops_number)} x "
                     f"{int(cfg.crops.local_crops_size)}")
            augmented[preset] = augment_rate(dataset, order, build_multicrop_augmentation(cfg))
        results["augment"] = {"reader": args.readers[0], "crops": crops, **augmented}
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    s, t = results["slide"], results["tissue"]
    print(f"slide {args.width} x {args.height} at {args.slide_mpp} µm/px, levels {s['level_sizes']}, "
          f"{args.compression} tiles, {s['file_mb']} MB (written in {s['write_s']} s); torch {torch.__version__}, "
          f"1 thread; {results['config']['date']}")
    print(f"load average (1, 5, 15 min): start {load_start}, end {results['loadavg_end']}")
    print(f"{'measure':<62} {'value':>14}")
    lines = [
        (f"tissue detection: thumbnail {t['thumbnail_shape'][1]} x {t['thumbnail_shape'][0]} read", f"{t['thumbnail_s']:.3f} s"),
        ("tissue detection: mask", f"{t['mask_s']:.3f} s"),
        ("tissue detection: total per slide", f"{t['total_s']:.3f} s"),
        ("tissue fraction found / true", f"{t['tissue_fraction_found']:.3f} / {s['tissue_fraction_true']:.3f}"),
        (f"tile_slide at {args.mpp} µm/px, {args.tile_size} px (level {results['tiling']['level']}, "
         f"read {results['tiling']['read_size']})", f"{results['tiling']['seconds']:.2f} s"),
        ("tiles kept", f"{results['tiling']['tiles_kept']}"),
    ]
    for reader, entry in reads.items():
        for kind in ("cold", "warm"):
            lines.append((f"read tiles/s, {reader}, {kind} ({entry[kind]['tiles']} tiles)",
                          f"{entry[kind]['tiles_per_s']:.1f}"))
    for preset in ("histology", "dinov2"):
        entry = augmented[preset]
        lines.append((f"read + {preset} multi-crop tiles/s ({entry['tiles']} tiles)", f"{entry['tiles_per_s']:.2f}"))
    for name, value in lines:
        print(f"{name:<62} {value:>14}")
    if "readers_max_abs_diff" in results:
        print(f"openslide vs tiffslide, tile 0: max abs pixel difference {results['readers_max_abs_diff']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
