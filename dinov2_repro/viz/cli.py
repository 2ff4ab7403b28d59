"""``dinov2-repro viz attention|pca``: where a backbone looks, and what its patch features separate.

    dinov2-repro viz attention --backbone runs/vits14 --images scans/ --out viz/ --compare random
    dinov2-repro viz pca --backbone dinov2_vits14_pretrain.pth --backbone random:vit_small/14 --images a.png b.png
    dinov2-repro viz attention --backbone runs/vits14 --images brain.nii.gz --out viz/ --block -2

attention: the CLS token's attention to the patches in one block (the last by default), averaged over heads, with
the smallest set of patches holding --mass of it outlined (DINO); every head in attention_heads_*.png. Register
tokens are left out of the maps and their share of the attention is printed and saved in attention.json.
pca: the first three principal components of the last block's patch features as RGB, background (low first
component) in black; jointly over all images unless --per-image (DINOv2, figure 1).

Advice: show the random baseline beside a trained backbone (--compare random): a random ViT's attention is spread
or follows intensity edges, a trained one's follows anatomy; that contrast is the point of the figure. Keep the
image count small (--max-images): every image is one forward pass per backbone.

SPEC: a run directory, a checkpoint or exported .pth, a hub file (dinov2_vits14_pretrain.pth), a Hugging Face
dinov2 folder, random:vit_small/14[,depth=..] or random:<run dir>. Nothing is downloaded.
IMAGES: image files, folders (recursive), NIfTI (.nii, .nii.gz) or DICOM volumes (--slices evenly spaced kept
slices of each). Whole-slide images are not supported yet.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="dinov2-repro viz", description=parts[0], epilog="\n\n".join(parts[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("view", choices=("attention", "pca"))
    parser.add_argument("--backbone", required=True, action="append", metavar="SPEC",
                        help="backbone to show; repeat to put several side by side")
    parser.add_argument("--images", required=True, nargs="+", metavar="PATH", help="images, folders or volumes")
    parser.add_argument("--out", default="viz", metavar="DIR", help="output folder for the PNGs and JSON (viz/)")
    parser.add_argument("--compare", choices=("random",), default=None,
                        help="add each backbone's randomly initialised twin (same architecture) beside it")
    parser.add_argument("--size", type=int, default=0,
                        help="shorter image side in pixels (default: the backbone's evaluation size); the aspect "
                             "ratio is kept and sides are cropped to a multiple of the patch")
    parser.add_argument("--square", action="store_true", help="centre square crop, as the evaluation protocols see")
    parser.add_argument("--block", type=int, default=-1, help="attention: block index, negative from the end (-1)")
    parser.add_argument("--mass", type=float, default=0.6, help="attention: share of the mass the mask holds (0.6)")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="pca: background below this on the first component, in standard deviations (0)")
    parser.add_argument("--per-image", action="store_true", help="pca: one PCA per image instead of a joint one")
    parser.add_argument("--max-images", type=int, default=8, help="at most this many images (8)")
    parser.add_argument("--slices", type=int, default=3, help="slices shown per volume (3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return parser


def run(args) -> dict:
    """Load, draw, write; returns the summary (also in <out>/<view>.json)."""
    from .views import visualize

    options = dict(size=args.size, square=args.square)
    if args.view == "attention":
        options.update(block=args.block, mass=args.mass)
    else:
        options.update(threshold=args.threshold, joint=not args.per_image)
    return visualize(args.view, args.backbone, args.images, args.out, compare_random=args.compare == "random",
                     device=args.device, max_images=args.max_images, slices_per_volume=args.slices, **options)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dinov2-repro viz``; returns the exit status (2 on a usage or input error)."""
    from ..models.weights import WeightsError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(args)
    except (WeightsError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"dinov2-repro viz {args.view}: error: {exc}", file=sys.stderr)
        return 2
    for image in summary["images"] if args.view == "attention" else []:
        for backbone in summary["backbones"]:
            stats = image[backbone["name"]]
            registers = (f", registers take {stats['register_share']:.0%} of the CLS attention"
                         if stats["registers"] else "")
            print(f"{image['name']} [{backbone['name']}]: peak patch {tuple(stats['peak'])} of "
                  f"{tuple(stats['grid'])}, {stats['mask_patches']} patches hold {args.mass:.0%}{registers}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} unreadable image(s): {', '.join(summary['skipped'][:5])}",
              file=sys.stderr)
    print(f"wrote {', '.join(summary['files'].values())} and {args.view}.json in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
