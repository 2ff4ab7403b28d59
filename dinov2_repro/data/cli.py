"""``dinov2-repro data``: generate the synthetic dataset, compute normalisation statistics.

  dinov2-repro data synth --out DIR --n-per-class N [--seed S] [--size 256] [--n-test-per-class M]
  dinov2-repro data stats --data DIR [--split Training] [--max-images N] [--num-workers W] [--json]
  dinov2-repro data synth-bench [--n-images 400] [--size 256]   (phantoms/s on one core; writes to a temp dir)
  dinov2-repro data inspect --data DIR [--split Training] [--contact-sheet sheet.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro data", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the built-in SYNTHETIC brain-MRI phantoms (not real data)")
    synth.add_argument("--out", required=True, help="output folder (Training/<class>, Testing/<class>)")
    synth.add_argument("--n-per-class", type=int, required=True, help="training images per class")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--n-test-per-class", type=int, default=None, help="default: max(1, n_per_class // 4)")
    synth.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("synth-bench", help="measure the synthetic generator's images/s on one core")
    bench.add_argument("--n-images", type=int, default=400)
    bench.add_argument("--size", type=int, default=256)

    stats = sub.add_parser("stats", help="per-channel mean/std on the [0, 1] scale for data.mean / data.std")
    stats.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    stats.add_argument("--split", default=None, help="e.g. Training; for CSVs the value of the split column")
    stats.add_argument("--max-images", type=int, default=None, help="a seeded random subset of this many images")
    stats.add_argument("--seed", type=int, default=0, help="seed of the --max-images subset")
    stats.add_argument("--num-workers", type=int, default=0, help="decode in this many worker processes")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of YAML lines")
    stats.add_argument("--no-progress", action="store_true")
    inspect = sub.add_parser("inspect", help="what the project will read: kinds, counts, classes, groups, and "
                                             "every unreadable file with its reason (it decodes everything)")
    inspect.add_argument("--data", required=True, help="dataset folder (images, NIfTI volumes, DICOM series) or CSV")
    inspect.add_argument("--split", default=None, help="e.g. Training; for CSVs the value of the split column")
    inspect.add_argument("--contact-sheet", default=None, metavar="PNG", help="also write sample images per class")
    inspect.add_argument("--no-progress", action="store_true")
    return parser


def _open_any(path: str, split: Optional[str]):
    """Labeled layouts (CSV, class folder, Kaggle + split) or, failing that, every image below the folder."""
    from .datasets import UnlabeledFolderDataset, looks_like_class_folder, looks_like_kaggle, resolve_split_dir
    from .loaders import build_image_dataset, volume_files_kind
    from .sources import manifest_dataset

    p = Path(path)
    if p.suffix.lower() == ".csv":
        return manifest_dataset(p, split=split)
    if p.is_dir() and volume_files_kind(resolve_split_dir(p, split)):
        folder = resolve_split_dir(p, split)
        return build_image_dataset(str(folder), volume_files_kind(folder))
    if looks_like_kaggle(p) and not split:
        split = "Training"
        print(f"# {p} has a Training split: using it (pass --split to choose)", file=sys.stderr)
    folder = resolve_split_dir(p, split)
    if looks_like_class_folder(folder):
        from .datasets import ClassFolderDataset

        return ClassFolderDataset(folder)
    return UnlabeledFolderDataset(folder)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from .synthetic import generate_dataset

        summary = generate_dataset(args.out, args.n_per_class, seed=args.seed, size=args.size,
                                   n_test_per_class=args.n_test_per_class, progress=not args.no_progress)
        if summary["skipped"]:
            print(f"{args.out}: already complete with these parameters, nothing written")
        else:
            print(f"wrote {summary['n_images']} SYNTHETIC images to {args.out} in {summary['seconds']:.1f} s "
                  f"({summary['images_per_s']:.0f} images/s); not real patient data")
        return 0
    if args.command == "synth-bench":
        from .synthetic import benchmark_generator

        r = benchmark_generator(args.n_images, args.size)
        print(f"synthetic phantoms {r['size']}x{r['size']}, {r['n_images']} images, one process:")
        print(f"  render only      : {r['render_images_per_s']:7.1f} images/s wall, "
              f"{r['render_images_per_cpu_s']:7.1f} images/s of CPU time")
        print(f"  render + PNG file: {r['render_and_write_images_per_s']:7.1f} images/s wall, "
              f"{r['render_and_write_images_per_cpu_s']:7.1f} images/s of CPU time")
        return 0
    if args.command == "stats":
        from .stats import compute_mean_std, format_yaml

        dataset = _open_any(args.data, args.split)
        stats = compute_mean_std(dataset, max_images=args.max_images, seed=args.seed,
                                 num_workers=args.num_workers, progress=not args.no_progress)
        if args.json:
            print(json.dumps({k: v for k, v in stats.items()}, indent=None))
        else:
            print(f"# {stats['n_images']} images, {stats['n_pixels']} pixels per channel, "
                  f"{stats['n_skipped']} unreadable, from {dataset.root}")
            print(format_yaml(stats))
        return 0
    if args.command == "inspect":
        from .inspect import contact_sheet, inspect_dataset

        dataset = _open_any(args.data, args.split)
        report = inspect_dataset(dataset, progress=not args.no_progress)
        print(report["text"])
        if args.contact_sheet:
            contact_sheet(dataset, args.contact_sheet)
            print(f"contact sheet: {args.contact_sheet}")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
