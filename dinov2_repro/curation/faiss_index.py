"""Faiss, imported lazily (it is an optional dependency), and the k-NN search the curation steps share.

Exact inner-product search (``IndexFlatIP``) below ``ivf_threshold`` vectors; above it an ``IndexIVFFlat``
(inner product, ``nlist`` about 4 sqrt(N) lists, ``nprobe`` lists visited per query), whose parameters are
returned so that every output folder records how its neighbours were found.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

IVF_THRESHOLD = 200_000  # vectors; below it exact search is fast enough on CPU (N^2 D / 1e11 s)
DEFAULT_NPROBE = 16


def require_faiss():
    """The faiss module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("data curation needs Faiss: pip install dinov2_repro[faiss] (or pip install faiss-cpu; "
                          "faiss-gpu for GPUs)") from exc
    return faiss


def faiss_gpus() -> int:
    """How many GPUs this faiss build can use (0 for faiss-cpu)."""
    faiss = require_faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4 sqrt(n), with at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, ivf_threshold: int = IVF_THRESHOLD, nlist: Optional[int] = None,
                nprobe: int = DEFAULT_NPROBE, seed: int = 0) -> Tuple[Any, Dict[str, Any]]:
    """An inner-product index over float32 (N, D) ``vectors``, and its parameters (kind, nlist, nprobe)."""
    faiss = require_faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < ivf_threshold:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, dict(kind="IndexFlatIP", n=n, dim=dim)
    nlist = int(nlist or ivf_nlist(n))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)  # the k-means of the coarse quantizer: seeded, so the lists are reproducible
    index.train(vectors)
    index.add(vectors)
    index.nprobe = min(int(nprobe), nlist)
    return index, dict(kind="IndexIVFFlat", n=n, dim=dim, nlist=nlist, nprobe=int(index.nprobe), seed=int(seed))


def knn(index, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(similarities (Q, k) float32, neighbour ids (Q, k) int64; -1 where fewer than k were found)."""
    k = max(1, min(int(k), int(index.ntotal)))
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, ids
