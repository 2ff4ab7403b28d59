"""``curate cluster`` and ``curate sample``: hierarchical k-means with resampling, then balanced hierarchical
sampling (Vo et al. 2024, "Automatic data curation for self-supervised learning: a clustering-based approach",
code ``ssl-data-curation``).

Level 1 clusters the embeddings into ``ks[0]`` clusters, level 2 clusters the level-1 centroids into ``ks[1]``,
and so on. Plain k-means puts many centroids in dense regions (the thousands of near-identical slices of one
scanner protocol); at each level, ``resampling_steps`` times, k-means is run again on the ``resample_size``
members of each cluster closest to its centroid, so that every cluster weighs the same, which spreads the
centroids over concepts.
Sampling then splits the target size equally over the top-level clusters (a cluster smaller than its share gives
all it has and the rest is shared among the others), recursively down to level 1, and draws points at random
inside each level-1 cluster: a rare concept keeps its images while a dominant one is thinned.

Faiss k-means runs on the CPU, or on GPUs when this faiss build has them. Every step is seeded. This module is
the single-process path; under torchrun (or srun) with more than one rank, `kmeans_dist.run_cluster` runs level 1
as Lloyd's k-means over ranks with torch.distributed instead, each rank holding its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .faiss_index import faiss_gpus, require_faiss

DEFAULT_KS = (100, 10)
DEFAULT_RESAMPLING_STEPS = 10
DEFAULT_NITER = 20


@dataclass
class Level:
    """One level: centroids (k, D) and the cluster (M,) of each item of the level below (points for level 1)."""

    centroids: np.ndarray
    assign: np.ndarray


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = DEFAULT_NITER, init=None) -> np.ndarray:
    """Faiss k-means centroids (min(k, N), D) of float32 (N, D) ``x``, from ``init`` centroids when given; on GPUs
    when this faiss build has them."""
    faiss = require_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=int(niter), seed=int(seed), gpu=faiss_gpus() > 0, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)  # never subsample: seeded as is
    if init is None and hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
        # k-means++ seeds: a random start draws its centroids where the points are dense, and a level of
        # centroids (mostly from one dominant concept) then merges the rare concepts it was meant to separate
        km.cp.init_method = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init[:k], dtype=np.float32))
    return km.centroids.copy()


def assign_to(centroids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(N,) index of the nearest centroid (L2) of each row of ``x``."""
    faiss = require_faiss()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0].astype(np.int64)


def member_distances(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """float32 (N,) squared L2 distance of each row of ``x`` (N, D) to its centroid ``centroids[assign]``."""
    return ((x - centroids[assign]) ** 2).sum(1)


def closest_members(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, size: int) -> np.ndarray:
    """Indices of the ``size`` members of each cluster closest to its centroid (all of a smaller cluster)."""
    distance = member_distances(x, centroids, assign)
    order = np.lexsort((distance, assign))  # by cluster, then closest first
    rank = np.arange(len(order)) - np.searchsorted(assign[order], assign[order])  # position inside its cluster
    return np.sort(order[rank < size])


def resampled_kmeans(x: np.ndarray, k: int, steps: int, size: int, seed: int, niter: int = DEFAULT_NITER) -> Level:
    """k-means, then ``steps`` times: k-means again (from the current centroids) on the ``size`` members of each
    cluster closest to its centroid. Each cluster then weighs the same, so a dense region stops drawing centroids."""
    centroids = kmeans(x, k, seed, niter)
    for step in range(int(steps)):
        subset = closest_members(x, centroids, assign_to(centroids, x), size)
        centroids = kmeans(x[subset], len(centroids), seed + 1 + step, niter, init=centroids)
    return Level(centroids, assign_to(centroids, x))


def members_per_cluster(resample_size: int, n: int, k: int) -> int:
    """Members per cluster in a resampling step over ``n`` items in ``k`` clusters: ``resample_size``, or 0 for a
    quarter of the mean cluster size (at least 2)."""
    return int(resample_size) or max(2, n // (4 * max(1, min(int(k), n))))


def hierarchical_kmeans(x: np.ndarray, ks: Sequence[int] = DEFAULT_KS, resampling_steps: int = DEFAULT_RESAMPLING_STEPS,
                        resample_size: int = 0, seed: int = 0, niter: int = DEFAULT_NITER) -> List[Level]:
    """Levels of clusters over float32 (N, D) ``x``. ``resample_size`` 0 takes a quarter of each level's mean
    cluster size (at least 2)."""
    levels, items = [], np.asarray(x, dtype=np.float32)
    for depth, k in enumerate(ks):
        size = members_per_cluster(resample_size, len(items), k)
        levels.append(resampled_kmeans(items, k, resampling_steps, size, seed + 100 * depth, niter))
        items = levels[-1].centroids
    return levels


def point_clusters(levels: Sequence[Level]) -> np.ndarray:
    """(N, L) int64: the cluster of every point at every level (composing the assignments)."""
    columns = [levels[0].assign]
    for level in levels[1:]:
        columns.append(level.assign[columns[-1]])
    return np.stack(columns, axis=1)


def level_sizes(clusters: np.ndarray, n_clusters: Sequence[int]) -> List[List[int]]:
    """Points per cluster at each level (``n_clusters[d]`` clusters at level d + 1), largest first."""
    return [sorted(np.bincount(clusters[:, d], minlength=n).tolist(), reverse=True)
            for d, n in enumerate(n_clusters)]


def water_fill(capacities: Sequence[int], total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` as equally as possible over bins holding at most ``capacities``; what a full bin cannot take
    goes to the others. The last units of an uneven split go to bins picked at random (seeded)."""
    capacities = np.asarray(capacities, dtype=np.int64)
    alloc = np.zeros_like(capacities)
    total = int(min(total, capacities.sum()))
    while total > 0:
        open_bins = np.flatnonzero(alloc < capacities)
        share = total // len(open_bins)
        if share == 0:
            alloc[rng.permutation(open_bins)[:total]] += 1
            break
        give = np.minimum(share, capacities[open_bins] - alloc[open_bins])
        alloc[open_bins] += give
        total -= int(give.sum())
    return alloc


def balanced_sample(clusters: np.ndarray, target: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``target`` points (all if fewer) drawn top-down from the hierarchy ``clusters`` (N, L)."""
    rng = np.random.default_rng(seed)
    chosen: List[np.ndarray] = []
    depth = clusters.shape[1] - 1
    pending = [(np.arange(len(clusters)), int(target), depth)]  # (members, how many to draw, level index)
    while pending:
        members, count, d = pending.pop()
        if d < 0:  # inside a level-1 cluster: a random subset
            chosen.append(rng.choice(members, size=count, replace=False))
            continue
        labels = np.unique(clusters[members, d])
        groups = [members[clusters[members, d] == c] for c in labels]
        for group, n in zip(groups, water_fill([len(g) for g in groups], count, rng)):
            if n:
                pending.append((group, int(n), d - 1))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def subset_rows(paths: Sequence[str], manifest) -> np.ndarray:
    """Rows whose path is listed in the CSV ``manifest`` (e.g. dedup's kept.csv), in order."""
    from ..data.datasets import CsvDataset

    listed = {p for p, _ in CsvDataset(manifest, check_files=False).samples}
    return np.array([r for r, p in enumerate(paths) if p in listed], dtype=np.int64)


def run_cluster_one_process(embed_dir, out_dir, *, ks: Sequence[int] = DEFAULT_KS,
                            resampling_steps: int = DEFAULT_RESAMPLING_STEPS, resample_size: int = 0, seed: int = 0,
                            niter: int = DEFAULT_NITER, subset=None, log=print) -> Dict[str, Any]:
    """`hierarchical_kmeans` of an ``embed`` folder (or of the rows a ``subset`` manifest lists) in this process;
    writes ``clusters.csv`` (path, label, cluster per level), ``centroids_level<d>.npy`` and ``params.json``.
    `kmeans_dist.run_cluster` chooses between this and the multi-rank path."""
    from .embed import load_embeddings

    emb = load_embeddings(embed_dir)
    rows = cluster_rows(emb, embed_dir, subset)
    levels = hierarchical_kmeans(emb.vectors[rows], ks, resampling_steps, resample_size, seed, niter)
    params = cluster_params(embed_dir, subset, ks, len(rows), resampling_steps, resample_size, seed, niter, emb)
    return write_clusters(out_dir, emb, rows, levels, params, log)


def cluster_rows(emb, embed_dir, subset) -> np.ndarray:
    """(M,) increasing rows of ``emb`` to cluster: all, or those a ``subset`` manifest lists; an error if none."""
    rows = subset_rows(emb.paths, subset) if subset else np.arange(len(emb))
    if not len(rows):
        raise ValueError(f"nothing to cluster: {embed_dir} holds no embedding" + (f" of a path in {subset}" if subset
                                                                                   else ""))
    return rows


def cluster_params(embed_dir, subset, ks: Sequence[int], n: int, resampling_steps: int, resample_size: int,
                   seed: int, niter: int, emb) -> Dict[str, Any]:
    """What ``params.json`` records of a clustering (`write_clusters` adds the cluster sizes)."""
    return dict(embeddings=str(embed_dir), subset=str(subset or ""), ks=[int(k) for k in ks], n=int(n),
                resampling_steps=int(resampling_steps), resample_size=int(resample_size), seed=int(seed),
                niter=int(niter), faiss_gpus=faiss_gpus(), classes=emb.classes)


def write_clusters(out_dir, emb, rows: np.ndarray, levels: Sequence[Level], params: Dict[str, Any],
                   log=print) -> Dict[str, Any]:
    """Write ``clusters.csv`` (the M ``rows`` of ``emb``: path, label, cluster per level; ``levels[0].assign`` is
    (M,)), ``centroids_level<d>.npy`` and ``params.json`` (``params`` plus the sizes); returns the params."""
    from pathlib import Path

    from .embed import save_npy, write_csv_atomic
    from .manifest import write_params

    clusters = point_clusters(levels)
    out_dir = Path(out_dir)
    columns = ["path", "label"] + [f"level{d + 1}" for d in range(len(levels))]
    write_csv_atomic(out_dir / "clusters.csv", columns,
                     [(emb.paths[r], emb.labels[r], *c) for r, c in zip(rows.tolist(), clusters.tolist())])
    for d, level in enumerate(levels):
        save_npy(out_dir / f"centroids_level{d + 1}.npy", level.centroids)
    sizes = level_sizes(clusters, [len(level.centroids) for level in levels])
    params = dict(params, sizes=sizes)
    write_params(out_dir, "cluster", params)
    for d, level_size in enumerate(sizes):
        log(f"[cluster] level {d + 1}: {len(level_size)} clusters of {len(rows)} images, sizes largest "
            f"{level_size[:5]} ... smallest {level_size[-3:]}")
    return params


def read_clusters(cluster_dir) -> Tuple[List[str], np.ndarray, List[int]]:
    """(paths, clusters (N, L) int64 per level, labels) of a ``cluster`` folder's ``clusters.csv``."""
    from pathlib import Path

    from .embed import read_csv_rows

    rows = read_csv_rows(Path(cluster_dir) / "clusters.csv")
    levels = sorted((c for c in rows[0] if c.startswith("level")), key=lambda c: int(c[5:])) if rows else []
    clusters = np.array([[int(r[c]) for c in levels] for r in rows], dtype=np.int64).reshape(len(rows), len(levels))
    return [r["path"] for r in rows], clusters, [int(r["label"]) for r in rows]


def run_sample(cluster_dir, out_dir, size: int, *, seed: int = 0, log=print) -> Dict[str, Any]:
    """`balanced_sample` of ``size`` images from a ``cluster`` folder; writes ``sampled.csv`` (a manifest for
    train, data.kind=csv) and ``params.json`` (images per top-level cluster before and after)."""
    import json
    from pathlib import Path

    from .manifest import write_manifest, write_params

    cluster_dir, out_dir = Path(cluster_dir), Path(out_dir)
    paths, clusters, labels = read_clusters(cluster_dir)
    chosen = balanced_sample(clusters, size, seed)
    classes = json.loads((cluster_dir / "params.json").read_text(encoding="utf-8")).get("classes") or []
    write_manifest(out_dir / "sampled.csv", [paths[i] for i in chosen], [labels[i] for i in chosen], classes)
    top = clusters[:, -1] if clusters.shape[1] else np.zeros(len(paths), np.int64)
    before, after = np.bincount(top), np.bincount(top[chosen], minlength=len(np.bincount(top)))
    params = dict(clusters=str(cluster_dir), size=int(size), seed=int(seed), n=len(paths), n_sampled=len(chosen),
                  top_level_before=before.tolist(), top_level_after=after.tolist())
    write_params(out_dir, "sample", params)
    log(f"[sample] {len(chosen)} of {len(paths)} images -> {out_dir / 'sampled.csv'}; per top-level cluster "
        f"before {before.tolist()[:10]}, after {after.tolist()[:10]}")
    return params
