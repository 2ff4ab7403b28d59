"""Time and peak memory of `curate dedup` and `curate cluster` on random unit vectors with planted duplicates.

N random 384-d unit vectors, of which ``--dup-fraction`` are near copies of others (cosine about 0.99); dedup runs
through the same code as the command (Faiss flat or IVF index, k-NN, components) and is scored on the planted
pairs; hierarchical k-means runs with the given levels. CPU, in this process.

    python benchmarks/curation_scale.py [--n 1000000] [--ks 1000,100] [--ivf-threshold 200000] [--json-out F]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import PeakMemory, fmt_bytes, write_json  # noqa: E402


def planted_vectors(n: int, dim: int, dup_fraction: float, seed: int):
    """(vectors (n, dim) float32 unit rows, origin (n,): the row each was copied from, itself for originals)."""
    rng = np.random.default_rng(seed)
    n_copies = int(n * dup_fraction)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    origin = np.arange(n)
    source = rng.choice(n - n_copies, n_copies, replace=False)
    noise = rng.standard_normal((n_copies, dim), dtype=np.float32)
    noise *= 0.14 / np.linalg.norm(noise, axis=1, keepdims=True)  # cosine about 1 / sqrt(1 + 0.14^2) = 0.99
    vectors[n - n_copies:] = vectors[source] + noise
    vectors[n - n_copies:] /= np.linalg.norm(vectors[n - n_copies:], axis=1, keepdims=True)
    origin[n - n_copies:] = source
    return vectors, origin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dup-fraction", type=float, default=0.05)
    parser.add_argument("--threshold", type=float, default=0.98)
    parser.add_argument("--ivf-threshold", type=int, default=200_000)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ks", default="1000,100")
    parser.add_argument("--resampling-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from dinov2_repro.curation.cluster import hierarchical_kmeans, level_sizes, point_clusters
    from dinov2_repro.curation.dedup import deduplicate

    vectors, origin = planted_vectors(args.n, args.dim, args.dup_fraction, args.seed)
    paths = [f"{i:09d}" for i in range(args.n)]
    cpu = torch.device("cpu")
    start = time.perf_counter()
    with PeakMemory(cpu) as dedup_memory:
        result = deduplicate(vectors, [""] * args.n, paths, threshold=args.threshold, k=4,
                             ivf_threshold=args.ivf_threshold, nprobe=args.nprobe, seed=args.seed)
    dedup_s = time.perf_counter() - start
    copies = origin != np.arange(args.n)
    found = result.group[copies] >= 0
    same = result.group[copies] == result.group[origin[copies]]
    wrongly = (~result.keep[~copies]).sum()  # originals removed: only right when an original is itself a copy's twin
    print(f"dedup   {args.n} x {args.dim}: {dedup_s:.1f} s, peak {fmt_bytes(dedup_memory.peak_bytes)}; "
          f"{result.params['index']}; planted copies grouped with their original {(found & same).mean():.4f}, "
          f"originals removed {int(wrongly)}")
    ks = [int(k) for k in args.ks.split(",")]
    start = time.perf_counter()
    with PeakMemory(cpu) as cluster_memory:
        levels = hierarchical_kmeans(vectors, ks, args.resampling_steps, seed=args.seed)
    cluster_s = time.perf_counter() - start
    sizes = level_sizes(point_clusters(levels), [len(level.centroids) for level in levels])
    print(f"cluster {args.n} x {args.dim}, ks {ks}, {args.resampling_steps} resampling steps: {cluster_s:.1f} s, "
          f"peak {fmt_bytes(cluster_memory.peak_bytes)}; level sizes max/min "
          f"{[(s[0], s[-1]) for s in sizes]}")
    write_json(args.json_out, dict(n=args.n, dim=args.dim, dedup_s=dedup_s, dedup_peak_bytes=dedup_memory.peak_bytes,
                                   index=result.params["index"], recall=float((found & same).mean()),
                                   cluster_s=cluster_s, cluster_peak_bytes=cluster_memory.peak_bytes, ks=ks,
                                   torch_threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
