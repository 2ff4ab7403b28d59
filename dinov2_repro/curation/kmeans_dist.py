"""Hierarchical k-means with resampling when each rank holds only its shard of the points (torch.distributed).

Rank r holds rows [offset_r, offset_r + n_r) of the N points, the shards in rank order making up the whole set.
What runs where:

* Init: k-means++ (`cluster.kmeans` with no iteration: the seeds faiss would start from) on rank 0, over a seeded
  sample of at most ``init_sample`` rows gathered there, then broadcast. When N <= ``init_sample`` the sample is
  every row in order, so the seeds are those of the single-process path for the same seed.
* Lloyd's iterations: each rank assigns its rows to the nearest centroid (faiss ``IndexFlatL2``,
  `cluster.assign_to`), sums them per cluster in float64, and one ``all_reduce`` of the sums and counts gives
  every rank the same new centroids (sum / count). An empty cluster is split off the largest one, as faiss does,
  but deterministically (`update_centroids`).
* Resampling: the ``size`` members of each cluster closest to its centroid are chosen among every rank's own
  ``size`` closest, gathered on all ranks (`closest_members_ranks`); k-means then runs again over ranks on those
  members, from the current centroids.
* Levels 2 and up cluster the level-1 centroids (a few thousand to millions of rows, the same on every rank):
  single-process `cluster.hierarchical_kmeans` on rank 0, broadcast.
* Output: rank 0 gathers the level-1 assignment of every row and writes the files of the single-process path.

The single-process path runs faiss's own Lloyd's iterations (float32 sums, a random split of empty clusters);
from the same seeds the two agree to float rounding while no cluster empties (see tests/test_curation_kmeans_dist.py).

Collectives go through the default process group: gloo with CPU tensors, or NCCL with tensors on this rank's GPU
when the caller made an NCCL group. The points stay numpy arrays on the host either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cluster import (DEFAULT_KS, DEFAULT_NITER, DEFAULT_RESAMPLING_STEPS, Level, assign_to, closest_members,
                      hierarchical_kmeans, kmeans, member_distances, members_per_cluster)

DEFAULT_INIT_SAMPLE = 1 << 20  # rows gathered on rank 0 for k-means++: 1.5 GiB at D = 384 in float32
SUM_BLOCK = 1 << 16  # rows converted to float64 at a time when summing per cluster
SPLIT_EPS = 1 / 1024  # faiss's relative perturbation when it splits a cluster


@dataclass(frozen=True)
class Ranks:
    """This process among those sharing the points: its rank, their number, and the device of the tensors the
    collectives exchange ("cpu" for gloo, "cuda:<i>" for NCCL). The default is a single process."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"


def group_ranks() -> Ranks:
    """`Ranks` of torch.distributed's default process group (a single process when there is none)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def several_ranks(env) -> bool:
    """Whether ``env`` (a `distributed.env.DistEnv`) or an existing process group has more than one rank."""
    return env.world_size > 1 or group_ranks().world > 1


# --- collectives on numpy arrays (identity for a single process) ---------------------------------------------------

def to_tensor(array: np.ndarray, ranks: Ranks):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(ranks.device)


def all_reduce_sum(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """The element-wise sum of ``array`` (same shape and dtype on every rank) over ranks, on every rank."""
    if ranks.world == 1:
        return array
    import torch.distributed as dist

    tensor = to_tensor(array, ranks)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def rank_counts(n: int, ranks: Ranks) -> np.ndarray:
    """(world,) int64: ``n`` of every rank, in rank order."""
    return all_gather_fixed(np.array([n], dtype=np.int64), ranks)


def all_gather_fixed(array: np.ndarray, ranks: Ranks) -> np.ndarray:
    """Every rank's ``array`` (same shape on every rank), concatenated along axis 0 in rank order."""
    if ranks.world == 1:
        return array
    import torch.distributed as dist

    tensor = to_tensor(array, ranks)
    parts = [tensor.new_empty(tensor.shape) for _ in range(ranks.world)]
    dist.all_gather(parts, tensor)
    return np.concatenate([p.cpu().numpy() for p in parts])


def gather_rows(array: np.ndarray, ranks: Ranks, everywhere: bool = True) -> Optional[np.ndarray]:
    """Every rank's rows of ``array`` (n_r, ...), concatenated in rank order: (sum of n_r, ...) on every rank, or
    on rank 0 alone (None elsewhere) when not ``everywhere``. Ranks may hold different numbers of rows."""
    if ranks.world == 1:
        return array
    import torch.distributed as dist

    counts = rank_counts(len(array), ranks)
    padded = np.zeros((int(counts.max()), *array.shape[1:]), dtype=array.dtype)  # collectives need one shape
    padded[:len(array)] = array
    tensor = to_tensor(padded, ranks)
    parts = [tensor.new_empty(tensor.shape) for _ in range(ranks.world)]
    if everywhere:
        dist.all_gather(parts, tensor)
    else:
        dist.gather(tensor, parts if ranks.rank == 0 else None, dst=0)
        if ranks.rank != 0:
            return None
    return np.concatenate([p.cpu().numpy()[:n] for p, n in zip(parts, counts.tolist())])


def broadcast_array(array: Optional[np.ndarray], shape: Tuple[int, ...], dtype, ranks: Ranks) -> np.ndarray:
    """Rank 0's ``array`` (``shape``, ``dtype``; ``array`` is ignored on the other ranks) on every rank."""
    if ranks.world == 1:
        return array
    import torch.distributed as dist

    tensor = to_tensor(array if ranks.rank == 0 else np.zeros(shape, dtype=dtype), ranks)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def broadcast_object(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's picklable ``obj`` on every rank (small things: levels 2 and up, the params)."""
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if ranks.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=ranks.device if ranks.device != "cpu" else None)
    return box[0]


# --- Lloyd's k-means over ranks --------------------------------------------------------------------------------

def cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """float64 (k, D) sum and int64 (k,) count of the rows of ``x`` (N, D) in each of the ``k`` clusters."""
    import torch

    sums = torch.zeros((k, x.shape[1]), dtype=torch.float64)
    index = torch.from_numpy(np.ascontiguousarray(assign, dtype=np.int64))
    for start in range(0, len(x), SUM_BLOCK):  # float64 copies of a block at a time, not of the whole shard
        block = torch.from_numpy(np.ascontiguousarray(x[start:start + SUM_BLOCK], dtype=np.float64))
        sums.index_add_(0, index[start:start + SUM_BLOCK], block)
    return sums.numpy(), np.bincount(assign, minlength=k).astype(np.int64)


def update_centroids(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float32 (k, D) means ``sums / counts`` of a Lloyd's step, empty clusters split off the largest.

    An empty cluster (in index order) takes the centroid of the cluster with the most points (the lowest index
    among equals) and the two are pushed apart by a relative 1/1024, up in even and down in odd coordinates for one
    and the reverse for the other, as faiss's ``split_clusters`` does; that cluster's count is then halved between
    the two, so a second empty cluster splits the next largest. Faiss picks the cluster to split at random
    (weighted by size); taking the largest makes the choice the same on every rank and in every run."""
    counts = counts.astype(np.float64)
    centroids = np.zeros(sums.shape, dtype=np.float32)
    full = counts > 0
    centroids[full] = (sums[full] / counts[full, None]).astype(np.float32)
    up = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS).astype(np.float32)
    empty = np.flatnonzero(~full)
    for ci in empty:
        cj = int(np.argmax(counts))
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * (2 - up)  # 1 - eps where ci got 1 + eps, and the reverse
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return centroids


def lloyd(x: np.ndarray, init: np.ndarray, niter: int, ranks: Ranks = Ranks()) -> np.ndarray:
    """float32 (k, D) centroids after ``niter`` Lloyd's steps from ``init`` (k, D) over every rank's rows ``x``
    (n_r, D): assign (faiss, on this rank's rows), sum per cluster, all-reduce, divide."""
    centroids = np.ascontiguousarray(init, dtype=np.float32)
    for _ in range(int(niter)):
        sums, counts = cluster_sums(x, assign_to(centroids, x), len(centroids))
        centroids = update_centroids(all_reduce_sum(sums, ranks), all_reduce_sum(counts, ranks))
    return centroids


def shard_offset(n: int, ranks: Ranks) -> Tuple[int, int]:
    """(row of this rank's first point in the whole set, N): the shards are in rank order."""
    counts = rank_counts(n, ranks)
    return int(counts[:ranks.rank].sum()), int(counts.sum())


def init_centroids(x: np.ndarray, k: int, seed: int, ranks: Ranks,
                   init_sample: int = DEFAULT_INIT_SAMPLE) -> np.ndarray:
    """float32 (k, D) k-means++ seeds (faiss, seeded) over a seeded sample of the N rows, on every rank.

    The sample is the same rows whatever the number of ranks, and all N rows, in order, when N <= ``init_sample``
    (then the seeds equal those of `cluster.kmeans` on the whole set). Rank 0 holds the sample: at most
    max(``init_sample``, k) rows, and k-means++ costs it O(sample x k x D)."""
    offset, total = shard_offset(len(x), ranks)
    size = min(total, max(int(init_sample), int(k)))
    rows = np.arange(total) if size == total else np.sort(np.random.default_rng(seed).choice(total, size, False))
    mine = rows[(rows >= offset) & (rows < offset + len(x))] - offset
    sample = gather_rows(np.ascontiguousarray(x[mine], dtype=np.float32), ranks, everywhere=False)
    seeds = kmeans(sample, k, seed, niter=0) if ranks.rank == 0 else None  # no iteration: faiss's seeds
    return broadcast_array(seeds, (k, x.shape[1]), np.float32, ranks)


def kmeans_ranks(x: np.ndarray, k: int, seed: int, niter: int = DEFAULT_NITER, init: Optional[np.ndarray] = None,
                 ranks: Ranks = Ranks(), init_sample: int = DEFAULT_INIT_SAMPLE) -> np.ndarray:
    """`cluster.kmeans` when every rank holds its rows ``x`` (n_r, D) of the N points: float32 (min(k, N), D)
    centroids, the same on every rank; from ``init`` when given (the same on every rank), else from
    `init_centroids`."""
    _, total = shard_offset(len(x), ranks)
    k = max(1, min(int(k), total))
    if total == k:  # faiss's corner case, followed so that both paths agree: the points are the centroids
        return gather_rows(np.ascontiguousarray(x, dtype=np.float32), ranks)
    if init is None:
        init = init_centroids(x, k, seed, ranks, init_sample)
    return lloyd(x, np.ascontiguousarray(init[:k], dtype=np.float32), niter, ranks)


def closest_members_ranks(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, size: int,
                          ranks: Ranks = Ranks()) -> np.ndarray:
    """Sorted indices into this rank's ``x`` (n_r, D) of its rows among the ``size`` members of each cluster
    closest to its centroid over all ranks (`cluster.closest_members` of the whole set, ties to the lower row).

    A member of the global top ``size`` is in its own rank's top ``size``, so every rank sends only those
    candidates, as (cluster, distance, row) float64 triples (exact for rows below 2^53): every rank receives at
    most min(N, world x k x ``size``) of them."""
    local = closest_members(x, centroids, assign, size)
    if ranks.world == 1:
        return local
    offset, _ = shard_offset(len(x), ranks)
    distance = member_distances(x[local], centroids, assign[local])
    mine = np.stack([assign[local], distance, local + offset], axis=1).astype(np.float64)
    cluster, distance, row = gather_rows(mine, ranks).T
    order = np.lexsort((row, distance, cluster))  # by cluster, then closest first, then lower row
    cluster = cluster[order]
    place = np.arange(len(order)) - np.searchsorted(cluster, cluster)  # position inside its cluster
    chosen = row[order][place < size].astype(np.int64)
    return np.sort(chosen[(chosen >= offset) & (chosen < offset + len(x))] - offset)


def resampled_kmeans_ranks(x: np.ndarray, k: int, steps: int, size: int, seed: int, niter: int = DEFAULT_NITER,
                           ranks: Ranks = Ranks(), init_sample: int = DEFAULT_INIT_SAMPLE) -> Level:
    """`cluster.resampled_kmeans` over ranks: the centroids (the same on every rank) and the cluster (n_r,) of
    each of this rank's rows ``x`` (n_r, D)."""
    centroids = kmeans_ranks(x, k, seed, niter, ranks=ranks, init_sample=init_sample)
    for step in range(int(steps)):
        subset = closest_members_ranks(x, centroids, assign_to(centroids, x), size, ranks)
        centroids = kmeans_ranks(x[subset], len(centroids), seed + 1 + step, niter, init=centroids, ranks=ranks)
    return Level(centroids, assign_to(centroids, x))


def hierarchical_kmeans_ranks(x: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                              resampling_steps: int = DEFAULT_RESAMPLING_STEPS, resample_size: int = 0,
                              seed: int = 0, niter: int = DEFAULT_NITER, ranks: Ranks = Ranks(),
                              init_sample: int = DEFAULT_INIT_SAMPLE) -> List[Level]:
    """`cluster.hierarchical_kmeans` over ranks: level 1 over every rank's rows ``x`` (n_r, D) (its ``assign`` is
    this rank's (n_r,)), the levels above on rank 0 from the level-1 centroids; every rank returns every level."""
    _, total = shard_offset(len(x), ranks)
    size = members_per_cluster(resample_size, total, ks[0])
    first = resampled_kmeans_ranks(x, ks[0], resampling_steps, size, seed, niter, ranks, init_sample)
    upper = None
    if ranks.rank == 0:  # identical inputs on every rank, but one rank computing them keeps them identical
        upper = hierarchical_kmeans(first.centroids, ks[1:], resampling_steps, resample_size, seed + 100, niter)
    return [first] + broadcast_object(upper, ranks)


# --- `curate cluster` over ranks ---------------------------------------------------------------------------------

def join_ranks(env) -> Tuple[Ranks, bool]:
    """`Ranks` of the existing default process group, or of one made from ``env`` (gloo: the points are host
    arrays); and whether it was made here (and must be torn down here)."""
    from ..distributed.env import init_distributed

    ranks = group_ranks()
    if ranks.world > 1:
        return ranks, False
    init_distributed(env, device_type="cpu")
    return group_ranks(), True


def rank_rows(rows: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's contiguous share of ``rows`` (M,): rank order is row order, as the shards must be."""
    return np.array_split(rows, ranks.world)[ranks.rank]


def run_cluster(embed_dir, out_dir, *, ks: Sequence[int] = DEFAULT_KS,
                resampling_steps: int = DEFAULT_RESAMPLING_STEPS, resample_size: int = 0, seed: int = 0,
                niter: int = DEFAULT_NITER, subset=None, env=None, init_sample: int = 0, log=print) -> Dict[str, Any]:
    """``curate cluster``: `cluster.run_cluster_one_process`, or `run_cluster_ranks` when ``env`` (a
    `distributed.env.DistEnv`; default: read from the launch environment) has more than one rank or a process group
    of several exists (``init_sample``: its k-means++ sample; 0 for the default)."""
    from ..distributed.env import detect_env
    from .cluster import run_cluster_one_process

    env = detect_env() if env is None else env  # the one place the launch environment is read
    if several_ranks(env):
        return run_cluster_ranks(embed_dir, out_dir, env, ks=ks, resampling_steps=resampling_steps,
                                 resample_size=resample_size, seed=seed, niter=niter, subset=subset,
                                 init_sample=init_sample or DEFAULT_INIT_SAMPLE, log=log)
    return run_cluster_one_process(embed_dir, out_dir, ks=ks, resampling_steps=resampling_steps,
                                   resample_size=resample_size, seed=seed, niter=niter, subset=subset, log=log)


def run_cluster_ranks(embed_dir, out_dir, env, *, ks: Sequence[int] = DEFAULT_KS,
                      resampling_steps: int = DEFAULT_RESAMPLING_STEPS, resample_size: int = 0, seed: int = 0,
                      niter: int = DEFAULT_NITER, subset=None, init_sample: int = DEFAULT_INIT_SAMPLE,
                      log=print) -> Dict[str, Any]:
    """`cluster.run_cluster_one_process` with each rank reading only its share of the rows of the ``embed``
    folder: the same files, written by rank 0, plus ``world_size`` and ``init_sample`` in ``params.json``; every
    rank returns the params. Uses the default process group, or makes one from ``env`` (a
    `distributed.env.DistEnv`) and tears it down at the end."""
    from ..distributed.env import teardown
    from .cluster import cluster_params, cluster_rows, write_clusters
    from .embed import embedding_rows, load_embeddings

    ranks, made = join_ranks(env)
    try:
        emb = load_embeddings(embed_dir, vectors=False)  # the index (paths) alone: every rank needs the row count
        rows = cluster_rows(emb, embed_dir, subset)
        mine = rank_rows(rows, ranks)
        x = embedding_rows(embed_dir, mine)
        log(f"[cluster] rank {ranks.rank}/{ranks.world}: {len(mine)} of {len(rows)} images")
        levels = hierarchical_kmeans_ranks(x, ks, resampling_steps, resample_size, seed, niter, ranks, init_sample)
        assign = gather_rows(levels[0].assign, ranks, everywhere=False)
        params = None
        if ranks.rank == 0:
            params = cluster_params(embed_dir, subset, ks, len(rows), resampling_steps, resample_size, seed, niter,
                                    emb)
            params.update(world_size=ranks.world, init_sample=int(init_sample))
            params = write_clusters(out_dir, emb, rows, [Level(levels[0].centroids, assign)] + levels[1:], params,
                                    log)
        return broadcast_object(params, ranks)  # also holds the other ranks until rank 0 has written
    finally:
        if made:
            teardown()
