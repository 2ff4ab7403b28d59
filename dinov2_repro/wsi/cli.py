"""``dinov2-repro wsi``: whole-slide tiling.

  dinov2-repro wsi tile SLIDES... --out DIR [--mpp 0.5 | --magnification 20] [--tile-size 256] [--overlap 0]
                        [--min-tissue 0.6] [--workers 4]
  dinov2-repro wsi export TABLES --out DIR      (PNG files of the tiles + DIR/tiles.csv for data.kind=csv)
  dinov2-repro wsi eval --backbone SPEC --tiles DIR --labels slides.csv --out DIR [--seeds 0,1,2]
                        [--fractions 1,0.75,0.5,0.25] [--max-tiles-per-slide N]

SLIDES are slide files or folders of them (searched recursively for the usual slide extensions). Per slide DIR gets
``<id>.tiles.csv`` (slide, level, x, y at level 0, size, tissue fraction, mpp), ``<id>.thumbnail.png`` and the
``<id>.done.json`` marker; a run started again skips the finished slides. Pretraining reads the tiles straight
from the slides with ``data.kind=wsi_tiles data.path=DIR``; ``export`` is for those who want files. ``eval``
trains attention-MIL on slide labels (``slide_id,label[,patient]``) over the tiles' embeddings at 100/75/50/25% of
the training labels and writes ``metrics.json``, ``report.md`` and attention heatmaps (`wsi.slide_eval`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def find_slides(inputs: List[str]) -> List[str]:
    """The slide files named or found (recursively, hidden entries skipped) under the folders named, sorted."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, filenames in os.walk(item, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.lower().endswith(SLIDE_EXTENSIONS) and not f.startswith(".")]
        elif os.path.exists(item):
            found.append(item)
        else:
            raise FileNotFoundError(f"slide or folder not found: {item}")
    return sorted(found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro wsi", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tile = sub.add_parser("tile", help="tissue tiles of whole slides: coordinates CSV + thumbnail per slide")
    tile.add_argument("slides", nargs="+", help="slide files or folders of slides")
    tile.add_argument("--out", required=True, help="output folder (never a slide folder)")
    target = tile.add_mutually_exclusive_group()
    target.add_argument("--mpp", type=float, default=None, help="target microns per pixel, e.g. 0.5")
    target.add_argument("--magnification", type=float, default=None, help="target magnification, e.g. 20")
    tile.add_argument("--slide-mpp", type=float, default=None, help="the slides' mpp when their metadata lacks it")
    tile.add_argument("--tile-size", type=int, default=256)
    tile.add_argument("--overlap", type=float, default=0.0, help="fraction of a tile shared with a neighbour")
    tile.add_argument("--min-tissue", type=float, default=0.6, help="keep tiles with at least this tissue fraction")
    tile.add_argument("--thumbnail-size", type=int, default=2048, help="longer side of the tissue-detection image")
    tile.add_argument("--reader", choices=("auto", "openslide", "tiffslide"), default="auto")
    tile.add_argument("--min-saturation", type=float, default=0.05, help="floor of the Otsu saturation threshold")
    tile.add_argument("--white", type=int, default=220, help="RGB above this in every channel is glass")
    tile.add_argument("--max-gray", type=float, default=0.85, help="darker than this (0-1) is tissue, however pale")
    tile.add_argument("--pen-min-saturation", type=float, default=0.4, help="blue/green ink at least this saturated")
    tile.add_argument("--black-value", type=float, default=0.15, help="HSV value below this is black ink")
    tile.add_argument("--workers", type=int, default=1, help="slides tiled in parallel (processes)")
    tile.add_argument("--shard", type=shard_spec, default=None, metavar="I/N",
                      help="tile only every N-th slide from the I-th (0-based) of the sorted list: one task of an "
                           "array (dinov2-repro submit --task wsi_tile sets it)")
    tile.add_argument("--no-progress", action="store_true")
    export = sub.add_parser("export", help="PNG files of the tiles of coordinates tables (resumable)")
    export.add_argument("tables", help="a folder of *.tiles.csv (the --out of wsi tile) or one table")
    export.add_argument("--out", required=True, help="output folder: <slide id>/<tile>.png and tiles.csv")
    export.add_argument("--no-progress", action="store_true")
    add_eval_parser(sub)
    return parser


def shard_spec(text: str):
    """"I/N" -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: needs 0 <= I < N")
    return index, count


def parse_tile_args(tile_args: List[str]) -> argparse.Namespace:
    """`wsi tile` arguments (without the word "tile") parsed by this command's own parser."""
    return _parser().parse_args(["tile", *tile_args])


def number_list(kind):
    """An argparse type: ``"0,1,2"`` -> (0, 1, 2) of ``kind``."""
    def parse(text: str):
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: no values")
        return values
    return parse


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="slide-level attention-MIL evaluation with label fractions")
    evaluate.add_argument("--backbone", required=True, help="backbone SPEC (run dir, checkpoint, random:ARCH/PATCH)")
    evaluate.add_argument("--tiles", required=True, help="the --out of wsi tile (a folder of *.tiles.csv)")
    evaluate.add_argument("--labels", required=True, help="CSV slide_id,label[,patient] (patient: patient-level "
                                                          "splits)")
    evaluate.add_argument("--out", required=True, help="output folder: metrics.json, report.md, heatmaps/")
    evaluate.add_argument("--seeds", type=number_list(int), default=(0, 1, 2), help="e.g. 0,1,2")
    evaluate.add_argument("--fractions", type=number_list(float), default=(1.0, 0.75, 0.5, 0.25),
                          help="fractions of the training slides' labels")
    evaluate.add_argument("--test-fraction", type=float, default=0.3, help="slides of each class held out for test")
    evaluate.add_argument("--split-seed", type=int, default=0)
    evaluate.add_argument("--max-tiles-per-slide", type=int, default=0, help="a seeded random subset (0: all)")
    evaluate.add_argument("--epochs", type=int, default=20)
    evaluate.add_argument("--lr", type=float, default=2e-4)
    evaluate.add_argument("--batch-size", type=int, default=64, help="tiles per backbone forward")
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:0 ...")
    evaluate.add_argument("--reader", choices=("auto", "openslide", "tiffslide"), default="auto")
    evaluate.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/embeddings)")
    evaluate.add_argument("--report-heatmaps", type=int, default=6, help="heatmaps shown in report.md")
    evaluate.add_argument("--no-progress", action="store_true")


def run_eval(args) -> int:
    from ..eval.backbone_spec import BackboneSpecError, environment_device
    from .slide_eval import SlideEvalOptions, evaluate_slides

    options = SlideEvalOptions(fractions=args.fractions, seeds=args.seeds, test_fraction=args.test_fraction,
                               split_seed=args.split_seed, max_tiles_per_slide=args.max_tiles_per_slide,
                               epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                               device=environment_device(args.device), reader=args.reader,
                               report_heatmaps=args.report_heatmaps)
    try:
        result = evaluate_slides(args.backbone, args.tiles, args.labels, args.out, options,
                                 cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, BackboneSpecError) as exc:
        print(f"wsi eval: {exc}", file=sys.stderr)
        return 2
    top = result["summary"][f"{float(options.fractions[0]):g}"]["roc_auc"]
    print(f"{result['n_slides']} slides ({result['splits']['test']['slides']} for test); "
          f"{float(options.fractions[0]):.0%} labels: test AUC {top['mean']:.3f}; report in {Path(args.out)}")
    return 0


def tile_options(args):
    from .tiler import TileOptions
    from .tissue import TissueParams

    tissue = TissueParams(min_saturation=args.min_saturation, max_gray=args.max_gray, white_rgb=args.white,
                          pen_min_saturation=args.pen_min_saturation, black_value=args.black_value)
    return TileOptions(tile_size=args.tile_size, overlap=args.overlap, min_tissue=args.min_tissue, mpp=args.mpp,
                       magnification=args.magnification, slide_mpp=args.slide_mpp,
                       thumbnail_size=args.thumbnail_size, reader=args.reader, tissue=tissue)


def run_tile(args) -> int:
    from .tiler import tile_slides

    slides = find_slides(args.slides)
    if not slides:
        print(f"no slides ({', '.join(SLIDE_EXTENSIONS)}) in {args.slides}")
        return 1
    if args.shard is not None:
        index, count = args.shard
        slides = slides[index::count]
        print(f"shard {index}/{count}: {len(slides)} slide(s)")
        if not slides:
            return 0
    results = tile_slides(slides, args.out, tile_options(args), workers=args.workers, progress=not args.no_progress)
    n_tiles = sum(r["n_tiles"] for r in results["done"])
    print(f"{len(results['done'])} slide(s) tiled ({n_tiles} tiles), {len(results['skipped'])} already done, "
          f"{len(results['failed'])} unreadable and skipped; outputs in {Path(args.out)}")
    return 1 if results["failed"] and not (results["done"] or results["skipped"]) else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "tile":
        return run_tile(args)
    if args.command == "export":
        from .tiles import export_tiles

        summary = export_tiles(args.tables, args.out, progress=not args.no_progress)
        print(f"{summary['n_tiles']} tiles in {args.out} ({summary['written']} written now, {summary['unreadable']} "
              f"unreadable); manifest {summary['manifest']} (data.kind=csv, group = slide)")
        return 0
    if args.command == "eval":
        return run_eval(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
