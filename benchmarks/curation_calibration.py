"""Calibrate `curate dedup`'s default cosine threshold on real photographs with planted copies.

Distinct images: non-overlapping 112 px tiles (flat ones left out) of 16 photographs shipped with scikit-image,
scikit-learn and matplotlib (short side shrunk to 336 px). Copies: each tile once resized, JPEG-recompressed,
slightly cropped and brightness-shifted (`dinov2_repro.curation.calibration`). Everything is embedded with the
backbone SPEC, deduplicated at each threshold, and scored pair by pair (precision, recall); the cosine of every copy
to its original (per kind of copy) and of every distinct tile to its nearest other tile is summarised too.
Figures: docs/curation.md.

    python benchmarks/curation_calibration.py --backbone SPEC [--out /tmp/calibration]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MIN_STD = 20.0  # grey levels
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.97, 0.98, 0.99)


def photographs():
    """16 photographs (RGB uint8 arrays) that ship with scikit-image, scikit-learn and matplotlib."""
    import matplotlib.cbook
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    colour = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.retina(), sk.hubble_deep_field(),
              sk.immunohistochemistry(), load_sample_image("china.jpg"), load_sample_image("flower.jpg"), hopper]
    gray = [np.stack([g] * 3, -1) for g in (sk.camera(), sk.brick(), sk.grass(), sk.gravel(), sk.moon(), sk.cell())]
    return colour + gray


def make_set(root: Path, tile: int = 112, short_side: int = 336, seed: int = 0):
    """Write originals and copies under ``root``; returns (paths, origin id of each)."""
    from PIL import Image

    from dinov2_repro.curation.calibration import COPY_KINDS, planted_copy

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths, origin = [], []
    for p, array in enumerate(photographs()):
        image = Image.fromarray(array).convert("RGB")
        scale = short_side / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        for y in range(0, image.height - tile + 1, tile):
            for x in range(0, image.width - tile + 1, tile):
                original = image.crop((x, y, x + tile, y + tile))
                if np.asarray(original, dtype=np.float32).std() < MIN_STD:
                    continue  # a flat tile (sky, background) is a copy of every other flat tile, not a distinct image
                name = f"p{p:02d}_{y:03d}_{x:03d}"
                original.save(root / f"{name}.png")
                paths.append(root / f"{name}.png")
                origin.append(len(set(origin)))
                for kind in COPY_KINDS:
                    planted_copy(original, kind, rng).save(root / f"{name}_{kind}.png")
                    paths.append(root / f"{name}_{kind}.png")
                    origin.append(origin[-1])
    return paths, origin


def print_kinds(emb, truth: np.ndarray, sims: np.ndarray) -> None:
    """Cosine of each kind of copy to its original: median, and the share at or above the default threshold."""
    from dinov2_repro.curation.calibration import COPY_KINDS
    from dinov2_repro.curation.dedup import DEFAULT_THRESHOLD

    names = [Path(p).stem for p in emb.paths]
    original = {truth[r]: r for r, n in enumerate(names) if not n.endswith(COPY_KINDS)}
    for kind in COPY_KINDS:
        values = np.array([sims[r, original[truth[r]]] for r, n in enumerate(names) if n.endswith(kind)])
        print(f"  {kind:<10}: cosine to original median {np.median(values):.3f}, "
              f">= {DEFAULT_THRESHOLD}: {(values >= DEFAULT_THRESHOLD).mean():.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="backbone SPEC (a random one gives meaningless figures)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()

    from dinov2_repro.curation.calibration import pair_scores
    from dinov2_repro.curation.dedup import components, deduplicate
    from dinov2_repro.curation.embed import embed_dataset, load_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        paths, origin = make_set(work / "images")
        embed_dataset(str(work / "images"), work / "emb", args.backbone, progress=False)
        emb = load_embeddings(work / "emb")
        by_path = dict(zip([str(p.resolve()) for p in paths], origin))
        truth = np.array([by_path[p] for p in emb.paths])
        sims = emb.vectors @ emb.vectors.T
        same = truth[:, None] == truth[None, :]
        np.fill_diagonal(sims, -2)
        copy_sims = sims[same & (sims > -2)]
        distinct_max = np.where(same, -2, sims).max(1)
        print(f"{len(set(truth))} distinct tiles, {len(truth) - len(set(truth))} copies, backbone {args.backbone}")
        print(f"cosine copy-to-same-origin: min {copy_sims.min():.3f}, 1% {np.percentile(copy_sims, 1):.3f}, "
              f"median {np.median(copy_sims):.3f}")
        print(f"cosine distinct nearest:    median {np.median(distinct_max):.3f}, "
              f"99% {np.percentile(distinct_max, 99):.3f}, max {distinct_max.max():.3f}")
        print_kinds(emb, truth, sims)
        print("| threshold | precision | recall | kept |\n| ---: | ---: | ---: | ---: |")
        for threshold in THRESHOLDS:
            result = deduplicate(emb.vectors, emb.hashes, emb.paths, threshold=threshold, k=16)
            labels = components(len(truth), np.concatenate([result.exact_pairs,
                                                           result.pairs[result.similarity >= threshold]]))
            score = pair_scores(labels, truth)
            print(f"| {threshold:.2f} | {score['precision']:.3f} | {score['recall']:.3f} | {int(result.keep.sum())} |")


if __name__ == "__main__":
    main()
