"""Calibrate `curate dedup`'s defaults on real photographs with planted copies.

Distinct images: non-overlapping 112 px tiles (flat ones left out) of 16 photographs shipped with scikit-image,
scikit-learn and matplotlib (short side shrunk to 336 px). Copies: each tile once resized, JPEG-recompressed,
slightly cropped and brightness-shifted (`dinov2_repro.curation.calibration`; ``--seed`` draws other edits).
Everything is embedded with the backbone SPEC and scored pair by pair (precision, recall):

1. embeddings alone (``--no-verify``) at each cosine threshold, with the cosine of every copy to its original per
   kind of copy and of every distinct tile to its nearest other tile;
2. with pixel verification (`dinov2_repro.curation.verify`): every k-NN pair at cosine >= the lowest candidate
   threshold is verified once (aligned NCC, timed per pair), then scored over a grid of (candidate threshold,
   verify threshold) and of k, with the recall the candidates allow before verification (perfect verification),
   and per kind of copy at the defaults;
3. decontamination at the defaults: half the tiles are the evaluation set, and the copies of those must leave a
   pretraining set made of them and of the other half (originals and copies).

Figures: docs/curation.md.

    python benchmarks/curation_calibration.py --backbone SPEC [--out /tmp/calibration] [--seed 0]
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
CANDIDATE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
VERIFY_THRESHOLDS = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
KS = (16, 32, 64, 96, 128)


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
    """Write originals and copies under ``root``; returns (paths, origin id of each). A folder that already holds
    the set of this seed (``root/.seed``) is left as it is, so that its embeddings stay valid for a rerun."""
    from PIL import Image

    from dinov2_repro.curation.calibration import COPY_KINDS, planted_copy

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / ".seed"
    if marker.is_file() and marker.read_text().strip() != str(seed):
        raise SystemExit(f"{root} holds the set of seed {marker.read_text().strip()}: use another --out")
    write = not marker.is_file()
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
                images = [(original, root / f"{name}.png")]
                images += [(planted_copy(original, kind, rng), root / f"{name}_{kind}.png") for kind in COPY_KINDS]
                for picture, path in images:
                    if write:
                        picture.save(path)
                    paths.append(path)
                origin += [len(set(origin))] * len(images)
    marker.write_text(f"{seed}\n")
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


def embedding_only(emb, truth: np.ndarray) -> None:
    """Part 1: the cosine of copies and of distinct neighbours, and P/R of `deduplicate` without verification."""
    from dinov2_repro.curation.calibration import pair_scores
    from dinov2_repro.curation.dedup import deduplicate

    sims = emb.vectors @ emb.vectors.T
    same = truth[:, None] == truth[None, :]
    np.fill_diagonal(sims, -2)
    copy_sims = sims[same & (sims > -2)]
    distinct_max = np.where(same, -2, sims).max(1)
    print(f"cosine copy-to-same-origin: min {copy_sims.min():.3f}, 1% {np.percentile(copy_sims, 1):.3f}, "
          f"median {np.median(copy_sims):.3f}")
    print(f"cosine distinct nearest:    median {np.median(distinct_max):.3f}, "
          f"99% {np.percentile(distinct_max, 99):.3f}, max {distinct_max.max():.3f}")
    print_kinds(emb, truth, sims)
    print("\nEmbeddings alone (--no-verify, k 16):")
    print("| threshold | precision | recall | kept |\n| ---: | ---: | ---: | ---: |")
    for threshold in THRESHOLDS:
        result = deduplicate(emb.vectors, emb.hashes, emb.paths, threshold=threshold, k=16)
        score = pair_scores(result_labels(result), truth)
        print(f"| {threshold:.2f} | {score['precision']:.3f} | {score['recall']:.3f} | {int(result.keep.sum())} |")


def result_labels(result) -> np.ndarray:
    """(N,) one label per image: its group, or a label of its own when it is in none."""
    return np.where(result.group >= 0, result.group, result.group.max(initial=-1) + 1 + np.arange(len(result.group)))


def measured_verifier(emb, k: int, candidate_threshold: float):
    """Verify every k-NN pair (``k``) at cosine >= ``candidate_threshold`` once; returns (a verifier that looks the
    scores up, for `deduplicate`, the `Verification`, the pairs)."""
    from dinov2_repro.curation.dedup import neighbour_pairs
    from dinov2_repro.curation.verify import Verification, file_loader, verify_pairs

    pairs, sims, _ = neighbour_pairs(emb.vectors, k)
    pairs = pairs[sims >= candidate_threshold]
    verification = verify_pairs(pairs, file_loader(emb.paths), emb.paths, progress=False)
    n = len(emb.paths)
    table = dict(zip((pairs[:, 0] * n + pairs[:, 1]).tolist(), verification.scores.tolist()))

    def verifier(candidates: np.ndarray) -> Verification:
        keys = (candidates[:, 0] * n + candidates[:, 1]).tolist()
        return Verification(np.array([table[key] for key in keys], np.float32))  # all measured above

    return verifier, verification, pairs


def candidate_recall(emb, truth: np.ndarray, k: int, candidate_threshold: float) -> float:
    """Pairwise recall if verification were perfect: components of the candidates that are true copies."""
    from dinov2_repro.curation.calibration import pair_scores
    from dinov2_repro.curation.dedup import components, neighbour_pairs

    pairs, sims, _ = neighbour_pairs(emb.vectors, k)
    true = pairs[(sims >= candidate_threshold) & (truth[pairs[:, 0]] == truth[pairs[:, 1]])]
    return pair_scores(components(len(truth), true), truth)["recall"]


def verified_scores(emb, truth, verifier, k, candidate_threshold, verify_threshold) -> dict:
    from dinov2_repro.curation.calibration import pair_scores
    from dinov2_repro.curation.dedup import deduplicate

    result = deduplicate(emb.vectors, emb.hashes, emb.paths, k=k, verifier=verifier,
                         candidate_threshold=candidate_threshold, verify_threshold=verify_threshold)
    return dict(pair_scores(result_labels(result), truth), kept=int(result.keep.sum()), result=result)


def verified_grids(emb, truth: np.ndarray) -> None:
    """Part 2: verified P/R over (candidate threshold, verify threshold) at the default k, and over k."""
    from dinov2_repro.curation.dedup import DEFAULT_CANDIDATE_K, DEFAULT_CANDIDATE_THRESHOLD
    from dinov2_repro.curation.verify import DEFAULT_VERIFY_THRESHOLD

    verifier, verification, pairs = measured_verifier(emb, max(KS), min(CANDIDATE_THRESHOLDS))
    print(f"\nVerification: {len(pairs)} k-NN pairs (k {max(KS)}, cosine >= {min(CANDIDATE_THRESHOLDS)}) in "
          f"{verification.seconds:.1f} s: {1e3 * verification.seconds / max(1, len(pairs)):.3f} ms per pair "
          f"(decoding, thumbnails and features included); {ncc_timing(emb)}")
    same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
    copies, distinct = verification.scores[same], verification.scores[~same]
    print(f"NCC of those pairs: copies of one tile 1 % {np.nanpercentile(copies, 1):.3f}, median "
          f"{np.nanmedian(copies):.3f}; different tiles 99.9 % {np.nanpercentile(distinct, 99.9):.3f}, max "
          f"{np.nanmax(distinct):.3f}")
    print(f"\nVerified, k {DEFAULT_CANDIDATE_K}: precision / recall (kept); 'before' = recall of the candidates "
          f"with perfect verification")
    print("| candidate cosine | before | " + " | ".join(f"NCC {v}" for v in VERIFY_THRESHOLDS) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in VERIFY_THRESHOLDS) + " |")
    for c in CANDIDATE_THRESHOLDS:
        cells = []
        for v in VERIFY_THRESHOLDS:
            score = verified_scores(emb, truth, verifier, DEFAULT_CANDIDATE_K, c, v)
            cell = f"{score['precision']:.3f} / {score['recall']:.3f} ({score['kept']})"
            cells.append(f"**{cell}**" if (c, v) == (DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_VERIFY_THRESHOLD) else cell)
        print(f"| {c:.2f} | {candidate_recall(emb, truth, DEFAULT_CANDIDATE_K, c):.3f} | " + " | ".join(cells) + " |")
    print(f"\nVerified over k (candidate cosine {DEFAULT_CANDIDATE_THRESHOLD}, NCC {DEFAULT_VERIFY_THRESHOLD}):")
    print("| k | candidates | before | precision | recall | kept |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in KS:
        score = verified_scores(emb, truth, verifier, k, DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_VERIFY_THRESHOLD)
        print(f"| {k} | {score['result'].params['n_candidates']} | "
              f"{candidate_recall(emb, truth, k, DEFAULT_CANDIDATE_THRESHOLD):.3f} | {score['precision']:.3f} | "
              f"{score['recall']:.3f} | {score['kept']} |")
    defaults = verified_scores(emb, truth, verifier, DEFAULT_CANDIDATE_K, DEFAULT_CANDIDATE_THRESHOLD,
                               DEFAULT_VERIFY_THRESHOLD)["result"]
    verified_kinds(emb, truth, defaults, pairs, verification.scores)


def ncc_timing(emb, n_pairs: int = 2000) -> str:
    """The NCC of a pair once both images' features are cached, and the features of one image, in ms."""
    import time

    from dinov2_repro.curation.verify import file_loader, gray_thumbnail, image_features, pair_ncc

    load = file_loader(emb.paths)
    thumbs = [gray_thumbnail(load(r)) for r in range(min(200, len(emb.paths)))]
    start = time.perf_counter()
    features = [image_features(t) for t in thumbs]
    per_image = (time.perf_counter() - start) / len(thumbs)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(features), size=(n_pairs, 2))
    start = time.perf_counter()
    for i, j in picks.tolist():
        pair_ncc(features[i], features[j])
    per_pair = (time.perf_counter() - start) / n_pairs
    return f"NCC alone {1e3 * per_pair:.3f} ms per pair, features {1e3 * per_image:.2f} ms per image"


def verified_kinds(emb, truth: np.ndarray, result, pairs: np.ndarray, scores: np.ndarray) -> None:
    """At the defaults, per kind of copy: its NCC to its original (when a candidate) and the share of copies
    grouped with their original, with verification and with embeddings alone (0.98, k 16)."""
    from dinov2_repro.curation.calibration import COPY_KINDS
    from dinov2_repro.curation.dedup import DEFAULT_THRESHOLD, deduplicate

    plain = deduplicate(emb.vectors, emb.hashes, emb.paths, threshold=DEFAULT_THRESHOLD, k=16)
    names = [Path(p).stem for p in emb.paths]
    original = {truth[r]: r for r, n in enumerate(names) if not n.endswith(COPY_KINDS)}
    ncc = dict(zip(map(tuple, pairs.tolist()), scores.tolist()))
    print("\nPer kind of copy, at the defaults:")
    print(f"| kind | NCC to original: min | 1 % | median | pair verified (k {max(KS)}, cos >= "
          f"{min(CANDIDATE_THRESHOLDS)}) | grouped with original (verified) | (embeddings alone, 0.98) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in COPY_KINDS:
        rows = [r for r, n in enumerate(names) if n.endswith(kind)]
        heads = [original[truth[r]] for r in rows]
        values = np.array([ncc.get((min(r, h), max(r, h)), np.nan) for r, h in zip(rows, heads)])
        found = np.array([result.group[r] >= 0 and result.group[r] == result.group[h] for r, h in zip(rows, heads)])
        alone = np.array([plain.group[r] >= 0 and plain.group[r] == plain.group[h] for r, h in zip(rows, heads)])
        seen = values[~np.isnan(values)]
        print(f"| {kind} | {seen.min():.3f} | {np.percentile(seen, 1):.3f} | {np.median(seen):.3f} | "
              f"{len(seen) / len(values):.0%} | {found.mean():.1%} | {alone.mean():.1%} |")


def decontamination(emb, truth: np.ndarray) -> None:
    """Part 3: the originals of even-numbered tiles are the evaluation set; the pretraining set is everything else.
    Removed should be exactly the copies of evaluation tiles."""
    from dinov2_repro.curation.calibration import COPY_KINDS
    from dinov2_repro.curation.decontaminate import contaminated, verification_of
    from dinov2_repro.curation.dedup import DEFAULT_THRESHOLD

    names = [Path(p).stem for p in emb.paths]
    is_original = np.array([not n.endswith(COPY_KINDS) for n in names])
    evaluation_rows = np.flatnonzero(is_original & (truth % 2 == 0))
    pretrain_rows = np.setdiff1d(np.arange(len(names)), evaluation_rows)
    pretrain, evaluation = subset(emb, pretrain_rows), subset(emb, evaluation_rows)
    positive = truth[pretrain_rows] % 2 == 0
    print(f"\nDecontamination: {len(evaluation_rows)} evaluation tiles, {len(pretrain_rows)} pretraining images of "
          f"which {int(positive.sum())} are copies of evaluation tiles")
    print("| rule | removed | precision | recall |\n| --- | ---: | ---: | ---: |")
    for label, verifier in (("embeddings alone, cosine >= %.2f" % DEFAULT_THRESHOLD, None),
                            ("verified (defaults)", verification_of(pretrain, evaluation, False, print))):
        removed = contaminated(pretrain, evaluation, verifier=verifier)[0]
        hits = int((removed & positive).sum())
        print(f"| {label} | {int(removed.sum())} | {hits / max(1, int(removed.sum())):.3f} | "
              f"{hits / int(positive.sum()):.3f} |")


def subset(emb, rows: np.ndarray):
    """The `Embeddings` of ``rows`` (same params: the rows still decode through the same dataset)."""
    from dinov2_repro.curation.embed import Embeddings

    rows = rows.tolist()
    return Embeddings(emb.vectors[rows], [emb.samples[r] for r in rows], [emb.paths[r] for r in rows],
                      [emb.labels[r] for r in rows], [emb.hashes[r] for r in rows], emb.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="backbone SPEC (a random one gives meaningless figures)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted edits (0: the calibration set)")
    parser.add_argument("--no-verify", action="store_true", help="part 1 only (embeddings alone)")
    args = parser.parse_args()

    from dinov2_repro.curation.embed import embed_dataset, load_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        paths, origin = make_set(work / "images", seed=args.seed)
        embed_dataset(str(work / "images"), work / "emb", args.backbone, progress=False)
        emb = load_embeddings(work / "emb")
        by_path = dict(zip([str(p.resolve()) for p in paths], origin))
        truth = np.array([by_path[p] for p in emb.paths])
        print(f"{len(set(truth))} distinct tiles, {len(truth) - len(set(truth))} copies (seed {args.seed}), "
              f"backbone {args.backbone}")
        embedding_only(emb, truth)
        if not args.no_verify:
            verified_grids(emb, truth)
            decontamination(emb, truth)


if __name__ == "__main__":
    main()
