"""``dinov2-repro curate``: data curation as in DINOv2 (embeddings, copy detection, decontamination, clustering).

  dinov2-repro curate embed --data DIR|CSV --backbone SPEC --out EMB [--split S] [--batch-size 64] [--shard-size 4096]
  dinov2-repro curate dedup --embeddings EMB --out DIR [--no-verify] [--candidate-threshold 0.5]
        [--verify-threshold 0.85] [--threshold 0.98] [--k 96 (16 with --no-verify)] [--ivf-threshold 200000]
  dinov2-repro curate decontaminate --embeddings EMB --against EVAL_DATA|EVAL_EMB --out DIR [--no-verify]
        [--candidate-threshold 0.5] [--verify-threshold 0.85] [--threshold 0.98]
  dinov2-repro curate cluster --embeddings EMB --out CLU [--ks 100,10] [--subset dedup/kept.csv] [--seed 0]
  dinov2-repro curate sample --clusters CLU --size N --out DIR     (DIR/sampled.csv: train with data.kind=csv)
  dinov2-repro curate retrieve --queries EMB_Q --pool EMB_P --out DIR [--k 4] [--clusters CLU_P --per-query M]

Under torchrun each rank embeds its own shards (shard % world size == rank) into the same --out folder, and cluster
runs its level-1 k-means over the ranks (torch.distributed, gloo), each rank reading only its share of the rows.
Only --out folders are written; the data folders are read.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro curate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_embed(sub)
    _add_copy_steps(sub)
    _add_cluster_steps(sub)
    _add_retrieve(sub)
    return parser


def _add_embed(sub) -> None:
    from .embed import SHARD_SIZE

    embed = sub.add_parser("embed", help="L2-normalised CLS embeddings of every image, fp16 shards, resumable")
    embed.add_argument("--data", required=True, help="image folder, Kaggle layout, CSV manifest, NIfTI or DICOM")
    embed.add_argument("--backbone", required=True, help="backbone SPEC (run folder, weights file, random:ARCH/P)")
    embed.add_argument("--out", required=True, help="output folder (resumes when it holds the same settings)")
    embed.add_argument("--kind", default="auto", help="data.kind: auto | folder | class_folder | kaggle | csv | ...")
    embed.add_argument("--split", default="", help="e.g. Training; for CSVs the value of the split column")
    embed.add_argument("--crop-size", type=int, default=0, help="input side (default: the backbone's own)")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per shard (the resume unit)")
    embed.add_argument("--num-workers", type=int, default=0, help="decoding processes")
    embed.add_argument("--device", default="auto")
    embed.add_argument("--no-progress", action="store_true")


def index_options(parser: argparse.ArgumentParser) -> None:
    """--ivf-threshold, --nprobe and --seed of the Faiss index (see faiss_index.build_index)."""
    from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD

    parser.add_argument("--ivf-threshold", type=int, default=IVF_THRESHOLD,
                        help="from this many vectors on, an IVF index replaces exact search")
    parser.add_argument("--nprobe", type=int, default=DEFAULT_NPROBE, help="IVF lists visited per query")
    parser.add_argument("--seed", type=int, default=0)


def verify_options(parser: argparse.ArgumentParser) -> None:
    """--verify/--no-verify, --candidate-threshold, --verify-threshold, --threshold and --no-progress."""
    from .dedup import DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_THRESHOLD
    from .verify import DEFAULT_VERIFY_THRESHOLD

    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check each candidate pair on its pixels (aligned NCC); --no-verify: embeddings alone")
    parser.add_argument("--candidate-threshold", type=float, default=DEFAULT_CANDIDATE_THRESHOLD,
                        help="with verification: cosine from which a k-NN pair is a candidate")
    parser.add_argument("--verify-threshold", type=float, default=DEFAULT_VERIFY_THRESHOLD,
                        help="with verification: aligned NCC from which a candidate is a copy")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="cosine similarity of a copy without verification (--no-verify, or a pair whose "
                             "images cannot be read)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar during verification")


def _add_copy_steps(sub) -> None:
    from .dedup import DEFAULT_CANDIDATE_K, DEFAULT_K

    dedup = sub.add_parser("dedup", help="exact and near duplicates (Faiss k-NN candidates verified on pixels), one "
                                         "kept per group")
    dedup.add_argument("--embeddings", required=True, help="a folder written by `curate embed`")
    dedup.add_argument("--out", required=True)
    verify_options(dedup)
    dedup.add_argument("--k", type=int, default=0, help=f"neighbours searched per image (default {DEFAULT_CANDIDATE_K} "
                                                        f"with verification, {DEFAULT_K} without)")
    dedup.add_argument("--nlist", type=int, default=0, help="IVF lists (default about 4 sqrt(N))")
    index_options(dedup)
    dedup.add_argument("--no-figure", action="store_true", help="skip the PNG grid of example pairs")

    decon = sub.add_parser("decontaminate", help="remove pretraining images that are copies of evaluation images")
    decon.add_argument("--embeddings", required=True, help="the pretraining set's `curate embed` folder")
    decon.add_argument("--against", required=True, help="evaluation data (embedded with the same backbone into "
                                                        "OUT/against) or its `curate embed` folder")
    decon.add_argument("--out", required=True)
    verify_options(decon)
    decon.add_argument("--k", type=int, default=0, help=f"evaluation neighbours searched per image (default "
                                                        f"{DEFAULT_CANDIDATE_K} with verification, 1 without)")
    index_options(decon)


def _add_cluster_steps(sub) -> None:
    from .cluster import DEFAULT_KS, DEFAULT_NITER, DEFAULT_RESAMPLING_STEPS

    cluster = sub.add_parser("cluster", help="hierarchical k-means with resampling (Vo et al. 2024) on Faiss")
    cluster.add_argument("--embeddings", required=True, help="a folder written by `curate embed`")
    cluster.add_argument("--out", required=True)
    cluster.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="clusters per level, bottom first")
    cluster.add_argument("--resampling-steps", type=int, default=DEFAULT_RESAMPLING_STEPS)
    cluster.add_argument("--resample-size", type=int, default=0,
                         help="members per cluster in a resampling step (0: a quarter of the mean cluster size)")
    cluster.add_argument("--niter", type=int, default=DEFAULT_NITER, help="k-means iterations")
    cluster.add_argument("--subset", default=None, help="cluster only the paths of this manifest (dedup's kept.csv)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--init-sample", type=int, default=0,
                         help="several ranks only: rows gathered on rank 0 for the k-means++ seeds (0: 2^20; with "
                              "fewer rows than this, all of them: the seeds of one process)")

    sample = sub.add_parser("sample", help="balanced hierarchical sampling to a target size; writes a manifest")
    sample.add_argument("--clusters", required=True, help="a folder written by `curate cluster`")
    sample.add_argument("--size", type=int, required=True, help="images to keep")
    sample.add_argument("--out", required=True)
    sample.add_argument("--seed", type=int, default=0)


def _add_retrieve(sub) -> None:
    retrieve = sub.add_parser("retrieve", help="pool images close to a curated query set (k-NN, or whole clusters)")
    retrieve.add_argument("--queries", required=True, help="`curate embed` folder of the curated (seed) images")
    retrieve.add_argument("--pool", required=True, help="`curate embed` folder of the uncurated pool")
    retrieve.add_argument("--out", required=True)
    retrieve.add_argument("--k", type=int, default=4, help="neighbours per query (k-NN mode)")
    retrieve.add_argument("--min-cosine", type=float, default=-1.0,
                          help="k-NN mode: keep neighbours at least this close")
    retrieve.add_argument("--clusters", default=None, help="cluster mode: a `curate cluster` folder of the whole pool")
    retrieve.add_argument("--per-query", type=int, default=0, help="cluster mode: images per query (0: the cluster)")
    index_options(retrieve)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        print(f"dinov2-repro curate {args.command}: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    if args.command == "embed":
        from .embed import embed_dataset

        summary = embed_dataset(args.data, args.out, args.backbone, kind=args.kind, split=args.split,
                                crop_size=args.crop_size, batch_size=args.batch_size, shard_size=args.shard_size,
                                num_workers=args.num_workers, device=args.device, progress=not args.no_progress)
        state = "complete" if summary["complete"] else "this rank's shards done, others pending"
        print(f"embedded {summary['n_images']} images into {args.out} ({state}); "
              f"{len(summary['skipped'])} unreadable file(s) skipped")
        return 0
    if args.command == "dedup":
        from .dedup import run_dedup

        run_dedup(args.embeddings, args.out, threshold=args.threshold, k=args.k, ivf_threshold=args.ivf_threshold,
                  nprobe=args.nprobe, nlist=args.nlist, seed=args.seed, verify=args.verify,
                  candidate_threshold=args.candidate_threshold, verify_threshold=args.verify_threshold,
                  figure=not args.no_figure, progress=not args.no_progress)
        return 0
    if args.command == "decontaminate":
        from .decontaminate import run_decontaminate

        run_decontaminate(args.embeddings, args.against, args.out, threshold=args.threshold, k=args.k,
                          ivf_threshold=args.ivf_threshold, nprobe=args.nprobe, seed=args.seed, verify=args.verify,
                          candidate_threshold=args.candidate_threshold, verify_threshold=args.verify_threshold,
                          progress=not args.no_progress)
        return 0
    if args.command == "cluster":
        from .kmeans_dist import run_cluster

        ks = [int(k) for k in args.ks.split(",") if k.strip()]
        if not ks or min(ks) < 1:
            raise ValueError(f"--ks {args.ks!r}: give clusters per level as positive integers, e.g. 100,10")
        run_cluster(args.embeddings, args.out, ks=ks, resampling_steps=args.resampling_steps,
                    resample_size=args.resample_size, seed=args.seed, niter=args.niter, subset=args.subset,
                    init_sample=args.init_sample)
        return 0
    if args.command == "sample":
        from .cluster import run_sample

        run_sample(args.clusters, args.out, args.size, seed=args.seed)
        return 0
    if args.command == "retrieve":
        from .retrieve import run_retrieve

        run_retrieve(args.queries, args.pool, args.out, k=args.k, min_cosine=args.min_cosine,
                     clusters_dir=args.clusters, per_query=args.per_query, ivf_threshold=args.ivf_threshold,
                     nprobe=args.nprobe, seed=args.seed)
        return 0
    return 2
