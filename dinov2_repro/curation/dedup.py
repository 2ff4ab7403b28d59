"""``curate dedup``: copy detection on `embed` embeddings (DINOv2, Oquab et al. 2023, section 3).

1. Exact duplicates: rows whose decoded pixels have the same sha1 (`embed` records it).
2. Near duplicates: each embedding's ``k`` nearest neighbours by inner product (cosine: rows are unit norm) through
   Faiss (`faiss_index.build_index`: exact below ``ivf_threshold``, IVF above it); a pair is a duplicate when its
   cosine similarity is at least ``threshold``.
3. Exact and near pairs are edges of a graph; each connected component is one group, so duplicates merge
   transitively (a ~ b ~ c puts a, b and c together even when a and c are further apart than the threshold).
4. One representative per group is kept: the smallest path (ties: the first row), so reruns keep the same files.

The default threshold is calibrated by ``benchmarks/curation_calibration.py`` (figures in docs/curation.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD, build_index, knn

DEFAULT_THRESHOLD = 0.98  # calibration: docs/curation.md (backbone-specific; the report grid helps choose)
DEFAULT_K = 16


@dataclass
class DedupResult:
    """keep (N,) bool; group (N,) int64 component id (-1: no duplicate); pairs (P, 2) rows i < j with their
    cosine ``similarity`` (P,) among the k-NN candidates (above and below the threshold, for the report)."""

    keep: np.ndarray
    group: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray
    exact_pairs: np.ndarray
    params: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())


def exact_pairs(hashes: Sequence[str]) -> np.ndarray:
    """(P, 2) int64: each row with the same content hash as an earlier row, paired with the first such row."""
    first: Dict[str, int] = {}
    pairs = []
    for row, digest in enumerate(hashes):
        if digest:
            head = first.setdefault(digest, row)
            if head != row:
                pairs.append((head, row))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def neighbour_pairs(vectors: np.ndarray, k: int = DEFAULT_K, ivf_threshold: int = IVF_THRESHOLD,
                    nprobe: int = DEFAULT_NPROBE, nlist: int = 0, seed: int = 0,
                    ) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Unique k-NN pairs (P, 2) with i < j, their cosine similarities (P,), and the index parameters."""
    index, params = build_index(vectors, ivf_threshold=ivf_threshold, nlist=nlist or None, nprobe=nprobe, seed=seed)
    sims, ids = knn(index, vectors, k + 1)  # + 1: each vector finds itself
    rows = np.repeat(np.arange(len(vectors)), ids.shape[1])
    cols, sims = ids.ravel(), sims.ravel()
    valid = (cols >= 0) & (cols != rows)
    pairs = np.stack([np.minimum(rows, cols), np.maximum(rows, cols)], axis=1)[valid]
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    params.update(k=int(k))
    return pairs.astype(np.int64), sims[valid][first].astype(np.float32), params


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """(N,) component label of each node of the graph with edges ``pairs`` (P, 2)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def representatives(labels: np.ndarray, paths: Sequence[str]) -> np.ndarray:
    """(N,) bool: the smallest path of each component (ties: the first row)."""
    best: Dict[int, int] = {}
    for row, label in enumerate(labels.tolist()):
        if label not in best or paths[row] < paths[best[label]]:
            best[label] = row
    keep = np.zeros(len(labels), dtype=bool)
    keep[list(best.values())] = True
    return keep


def group_ids(labels: np.ndarray) -> np.ndarray:
    """Component labels -> group ids 0.. for components of 2+ rows (in order of first row), -1 for singletons."""
    sizes = np.bincount(labels)
    ids, out = {}, np.full(len(labels), -1, dtype=np.int64)
    for row, label in enumerate(labels.tolist()):
        if sizes[label] > 1:
            out[row] = ids.setdefault(label, len(ids))
    return out


def deduplicate(vectors: np.ndarray, hashes: Sequence[str], paths: Sequence[str], *,
                threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K, ivf_threshold: int = IVF_THRESHOLD,
                nprobe: int = DEFAULT_NPROBE, nlist: int = 0, seed: int = 0) -> DedupResult:
    """Copy detection over unit-norm float32 ``vectors`` (N, D) with content ``hashes`` and ``paths`` (N)."""
    n = len(paths)
    exact = exact_pairs(hashes)
    if n > 1:
        pairs, sims, index_params = neighbour_pairs(vectors, k, ivf_threshold, nprobe, nlist, seed)
    else:
        pairs, sims, index_params = np.zeros((0, 2), np.int64), np.zeros(0, np.float32), dict(kind="none", n=n)
    edges = np.concatenate([exact, pairs[sims >= threshold]])
    labels = components(n, edges)
    params = dict(threshold=float(threshold), index=index_params, n=n, n_exact_pairs=len(exact),
                  n_near_pairs=int((sims >= threshold).sum()))
    return DedupResult(representatives(labels, paths), group_ids(labels), pairs, sims, exact, params)


def group_rows(result: DedupResult, vectors: np.ndarray, paths: Sequence[str]) -> List[Tuple]:
    """(group, path, kept, cosine to the group's representative) of every row in a group, by group then path."""
    members = defaultdict(list)
    for row in np.flatnonzero(result.group >= 0).tolist():
        members[int(result.group[row])].append(row)
    out = []
    for group in sorted(members):
        rows = sorted(members[group], key=lambda r: (paths[r], r))
        head = next(r for r in rows if result.keep[r])
        out += [(group, paths[r], int(result.keep[r]), round(float(vectors[r] @ vectors[head]), 4)) for r in rows]
    return out


def run_dedup(embed_dir, out_dir, *, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K,
              ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, nlist: int = 0, seed: int = 0,
              figure: bool = True, log=print) -> Dict[str, Any]:
    """`deduplicate` the embeddings of ``embed_dir`` and write ``kept.csv``, ``removed.csv``, ``groups.csv``,
    ``pairs.png``, ``report.md`` and ``params.json`` into ``out_dir``; returns the parameters and counts."""
    from .embed import load_embeddings, open_dataset, write_csv_atomic
    from .manifest import write_manifest, write_params
    from .report import example_pairs, pairs_figure, write_dedup_report

    emb = load_embeddings(embed_dir)
    result = deduplicate(emb.vectors, emb.hashes, emb.paths, threshold=threshold, k=k, ivf_threshold=ivf_threshold,
                         nprobe=nprobe, nlist=nlist, seed=seed)
    kept = np.flatnonzero(result.keep)
    write_manifest(Path(out_dir) / "kept.csv", [emb.paths[r] for r in kept], [emb.labels[r] for r in kept],
                   emb.classes)
    write_csv_atomic(Path(out_dir) / "removed.csv", ["path"], [(emb.paths[r],) for r in np.flatnonzero(~result.keep)])
    write_csv_atomic(Path(out_dir) / "groups.csv", ["group", "path", "kept", "cosine_to_kept"],
                     group_rows(result, emb.vectors, emb.paths))
    params = dict(result.params, embeddings=str(embed_dir), k=int(k), seed=int(seed), n_kept=len(kept),
                  n_removed=result.n_removed, n_groups=int(result.group.max(initial=-1) + 1),
                  skipped=len(emb.skipped))
    examples = example_pairs(result.pairs, result.similarity, threshold) if figure else []
    if examples:
        dataset = open_dataset(emb.params["data"], emb.params["kind"], emb.params["split"])
        pairs_figure(Path(out_dir) / "pairs.png", dataset, emb.samples, examples, threshold)
    write_dedup_report(out_dir, params, result.similarity, "pairs.png" if examples else "")
    write_params(out_dir, "dedup", params)
    log(f"[dedup] kept {len(kept)} of {params['n']} images, removed {result.n_removed} in {params['n_groups']} "
        f"group(s) ({params['n_exact_pairs']} exact, {params['n_near_pairs']} near pair(s) at cosine >= "
        f"{threshold}); {params['index']['kind']}; report {Path(out_dir) / 'report.md'}")
    return params
