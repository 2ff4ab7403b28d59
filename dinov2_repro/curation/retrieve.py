"""``curate retrieve``: the pool images close to a curated query set (DINOv2, Oquab et al. 2023, section 3).

Two modes, as in the paper:

- k-NN (large query sets): each query's ``k`` nearest pool images by cosine (Faiss), kept when the cosine is at
  least ``min_cosine``;
- clusters (small query sets): each query is assigned to its nearest level-1 cluster of the pool (a
  ``curate cluster`` folder made on the pool embeddings) and ``per_query`` of that cluster's images are taken at
  random (seeded; all of them with ``per_query`` 0).

The union of the retrieved pool images is written as a manifest, with one row per (query, pool image) pair in
``pairs.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD, build_index, knn


def retrieve_knn(queries: np.ndarray, pool: np.ndarray, k: int = 4, min_cosine: float = -1.0,
                 ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE,
                 seed: int = 0) -> Tuple[List[Tuple[int, int, float]], Dict[str, Any]]:
    """(query row, pool row, cosine) of each query's ``k`` nearest pool rows at cosine >= ``min_cosine``; and the
    index parameters. ``queries`` (Q, D) and ``pool`` (N, D) are unit-norm float32."""
    index, params = build_index(pool, ivf_threshold=ivf_threshold, nprobe=nprobe, seed=seed)
    sims, ids = knn(index, queries, k)
    pairs = [(q, int(p), float(s)) for q in range(len(queries)) for p, s in zip(ids[q], sims[q])
             if p >= 0 and s >= min_cosine]
    return pairs, dict(params, k=int(k), min_cosine=float(min_cosine))


def retrieve_clusters(queries: np.ndarray, centroids: np.ndarray, pool_clusters: np.ndarray, per_query: int,
                      seed: int = 0) -> List[Tuple[int, int, float]]:
    """(query row, pool row, nan) for ``per_query`` random members (all with 0) of each query's nearest cluster;
    ``pool_clusters`` (N,) is the level-1 cluster of every pool row."""
    from .cluster import assign_to

    rng = np.random.default_rng(seed)
    nearest = assign_to(centroids, queries)
    pairs = []
    for q, cluster in enumerate(nearest.tolist()):
        members = np.flatnonzero(pool_clusters == cluster)
        if per_query and len(members) > per_query:
            members = np.sort(rng.choice(members, per_query, replace=False))
        pairs += [(q, int(m), float("nan")) for m in members]
    return pairs


def run_retrieve(queries_dir, pool_dir, out_dir, *, k: int = 4, min_cosine: float = -1.0, clusters_dir=None,
                 per_query: int = 0, ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE,
                 seed: int = 0, log=print) -> Dict[str, Any]:
    """Retrieve from the ``pool_dir`` embeddings for the ``queries_dir`` embeddings (k-NN, or clusters when
    ``clusters_dir`` is given); writes ``retrieved.csv`` (manifest), ``pairs.csv`` and ``params.json``."""
    from .cluster import read_clusters
    from .embed import load_embeddings, write_csv_atomic
    from .manifest import write_manifest, write_params

    queries, pool, out_dir = load_embeddings(queries_dir), load_embeddings(pool_dir), Path(out_dir)
    if queries.params["backbone"] != pool.params["backbone"]:
        raise ValueError(f"{queries_dir} and {pool_dir} were embedded with different backbones: use one SPEC")
    if clusters_dir:
        paths, clusters, _ = read_clusters(clusters_dir)
        if paths != pool.paths:
            raise ValueError(f"{clusters_dir} was not made on all of {pool_dir} (cluster the pool without --subset)")
        centroids = np.load(Path(clusters_dir) / "centroids_level1.npy")
        pairs = retrieve_clusters(queries.vectors, centroids, clusters[:, 0], per_query, seed)
        params: Dict[str, Any] = dict(mode="clusters", clusters=str(clusters_dir), per_query=int(per_query))
    else:
        pairs, index = retrieve_knn(queries.vectors, pool.vectors, k, min_cosine, ivf_threshold, nprobe, seed)
        params = dict(mode="knn", index=index)
    rows = sorted({p for _, p, _ in pairs})
    write_manifest(out_dir / "retrieved.csv", [pool.paths[r] for r in rows], [pool.labels[r] for r in rows],
                   pool.classes)
    write_csv_atomic(out_dir / "pairs.csv", ["query", "pool", "cosine"],
                     [(queries.paths[q], pool.paths[p], "" if np.isnan(s) else round(s, 4)) for q, p, s in pairs])
    params.update(queries=str(queries_dir), pool=str(pool_dir), seed=int(seed), n_queries=len(queries),
                  n_pool=len(pool), n_retrieved=len(rows))
    write_params(out_dir, "retrieve", params)
    log(f"[retrieve] {len(rows)} of {len(pool)} pool images retrieved for {len(queries)} queries "
        f"({params['mode']}) -> {out_dir / 'retrieved.csv'}")
    return params
