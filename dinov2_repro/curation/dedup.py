"""``curate dedup``: copy detection on `embed` embeddings (DINOv2, Oquab et al. 2023, section 3).

1. Exact duplicates: rows whose decoded pixels have the same sha1 (`embed` records it).
2. Near duplicates, retrieved: each embedding's ``k`` nearest neighbours by inner product (cosine: rows are unit
   norm) through Faiss (`faiss_index.build_index`: exact below ``ivf_threshold``, IVF above it).
3. Near duplicates, verified (the default; the retrieve-then-verify structure of copy-detection systems): k-NN
   pairs at cosine >= ``candidate_threshold`` are candidates, and a candidate is a copy when the aligned
   normalised cross-correlation of its two images (`verify.aligned_ncc`: translations, a grid of scales, both
   directions) is >= ``verify_threshold``. A candidate whose images cannot be read is decided as without
   verification. Without verification a pair is a copy when its cosine is >= ``threshold``.
4. Exact and near pairs are edges of a graph; each connected component is one group, so duplicates merge
   transitively (a ~ b ~ c puts a, b and c together even when a and c are further apart than the threshold).
5. One representative per group is kept: the smallest path (ties: the first row), so reruns keep the same files.

The default thresholds and ``k`` are calibrated by ``benchmarks/curation_calibration.py`` (docs/curation.md).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD, build_index, knn
from .verify import DEFAULT_VERIFY_THRESHOLD, Verification, report_unreadable, verified_copies

DEFAULT_THRESHOLD = 0.98  # without verification; calibration: docs/curation.md (backbone-specific)
DEFAULT_K = 16  # without verification
# With verification the embeddings only propose: a loose cosine and many neighbours, so that a copy the backbone
# moved far (a crop, a brightness shift) is still proposed; calibration: docs/curation.md.
DEFAULT_CANDIDATE_THRESHOLD = 0.5
DEFAULT_CANDIDATE_K = 96


@dataclass
class DedupResult:
    """keep (N,) bool; group (N,) int64 component id (-1: no duplicate); pairs (P, 2) rows i < j with their
    cosine ``similarity`` (P,) among the k-NN pairs (above and below the threshold, for the report); ``ncc`` (P,)
    their aligned NCC (NaN: not a candidate, not verified, or unreadable); ``near`` (P,) bool: the pair is an edge;
    ``unreadable``: images verification could not read."""

    keep: np.ndarray
    group: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray
    exact_pairs: np.ndarray
    params: Dict[str, Any]
    ncc: np.ndarray
    near: np.ndarray
    unreadable: List[str] = field(default_factory=list)

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
    low, high = np.minimum(rows, cols)[valid], np.maximum(rows, cols)[valid]
    # one int64 key per pair: a 1-D unique sorts as (low, high) would, much faster than rows of 2 at k 96
    keys, first = np.unique(low.astype(np.int64) * len(vectors) + high, return_index=True)
    params.update(k=int(k))
    pairs = np.stack(np.divmod(keys, len(vectors)), axis=1)
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


def near_edges(pairs: np.ndarray, sims: np.ndarray, verifier: Optional[Callable[[np.ndarray], Verification]],
               threshold: float, candidate_threshold: float, verify_threshold: float,
               ) -> Tuple[np.ndarray, np.ndarray, Optional[Verification], Dict[str, Any]]:
    """Which k-NN pairs (P, 2) with cosines ``sims`` (P,) are copies: (near (P,) bool, ncc (P,) float32 NaN where not
    verified, the `Verification` or None, counts). ``verifier`` None: cosine >= threshold."""
    ncc = np.full(len(pairs), np.nan, np.float32)
    if verifier is None:
        near = sims >= threshold
        return near, ncc, None, dict(n_near_pairs=int(near.sum()))
    candidate = sims >= candidate_threshold
    verification = verifier(pairs[candidate])
    ncc[candidate] = verification.scores
    near, counts = verified_copies(sims, ncc, candidate, verification, threshold, verify_threshold)
    return near, ncc, verification, dict(n_near_pairs=int(near.sum()), **counts)


def deduplicate(vectors: np.ndarray, hashes: Sequence[str], paths: Sequence[str], *,
                threshold: float = DEFAULT_THRESHOLD, k: int = 0, ivf_threshold: int = IVF_THRESHOLD,
                nprobe: int = DEFAULT_NPROBE, nlist: int = 0, seed: int = 0,
                verifier: Optional[Callable[[np.ndarray], Verification]] = None,
                candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                verify_threshold: float = DEFAULT_VERIFY_THRESHOLD) -> DedupResult:
    """Copy detection over unit-norm float32 ``vectors`` (N, D) with content ``hashes`` and ``paths`` (N).

    ``verifier`` None: embeddings alone (a k-NN pair is a copy at cosine >= ``threshold``; ``k`` 0 means
    `DEFAULT_K`). Else ``verifier(candidates (C, 2))`` returns their `Verification` (aligned NCC, NaN when an image
    cannot be read; `verify.verify_pairs`), candidates being the k-NN pairs at cosine >= ``candidate_threshold``
    (``k`` 0 means `DEFAULT_CANDIDATE_K`), copies those at NCC >= ``verify_threshold``, and unreadable ones decided
    by ``threshold`` as without verification."""
    n = len(paths)
    k = int(k) or (DEFAULT_K if verifier is None else DEFAULT_CANDIDATE_K)
    exact = exact_pairs(hashes)
    if n > 1:
        pairs, sims, index_params = neighbour_pairs(vectors, k, ivf_threshold, nprobe, nlist, seed)
    else:
        pairs, sims, index_params = np.zeros((0, 2), np.int64), np.zeros(0, np.float32), dict(kind="none", n=n)
    near, ncc, verification, counts = near_edges(pairs, sims, verifier, threshold, candidate_threshold,
                                                 verify_threshold)
    labels = components(n, np.concatenate([exact, pairs[near]]))
    params = dict(threshold=float(threshold), k=k, verify=verifier is not None, index=index_params, n=n,
                  n_exact_pairs=len(exact), **counts)
    if verifier is not None:
        params.update(candidate_threshold=float(candidate_threshold), verify_threshold=float(verify_threshold))
    return DedupResult(representatives(labels, paths), group_ids(labels), pairs, sims, exact, params, ncc, near,
                       verification.unreadable if verification else [])


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


def group_edges(result: DedupResult, vectors: np.ndarray, paths: Sequence[str]) -> List[Tuple]:
    """(group, path_a, path_b, how, cosine, ncc) of every edge that joined a group, by group: ``how`` is ``exact``
    (same pixels), ``ncc`` (a verified candidate) or ``cosine`` (cosine >= threshold: no verification, or an image
    verification could not read); ``ncc`` is the aligned NCC when it was measured, else empty."""
    exact = {tuple(p) for p in result.exact_pairs.tolist()}
    ncc = result.ncc
    rows = [(i, j, "exact", float(vectors[i] @ vectors[j]), np.nan) for i, j in sorted(exact)]
    for p in np.flatnonzero(result.near).tolist():
        i, j = result.pairs[p].tolist()
        if (i, j) not in exact:
            rows.append((i, j, "cosine" if np.isnan(ncc[p]) else "ncc", float(result.similarity[p]), float(ncc[p])))
    rows.sort(key=lambda r: (int(result.group[r[0]]), paths[r[0]], paths[r[1]]))
    return [(int(result.group[i]), paths[i], paths[j], how, round(cos, 4), "" if np.isnan(score) else round(score, 4))
            for i, j, how, cos, score in rows]


def run_dedup(embed_dir, out_dir, *, threshold: float = DEFAULT_THRESHOLD, k: int = 0,
              ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, nlist: int = 0, seed: int = 0,
              verify: bool = True, candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
              verify_threshold: float = DEFAULT_VERIFY_THRESHOLD, figure: bool = True, progress: bool = True,
              log=print) -> Dict[str, Any]:
    """`deduplicate` the embeddings of ``embed_dir`` (with pixel verification unless ``verify`` is False) and write
    ``kept.csv``, ``removed.csv``, ``groups.csv``, ``edges.csv``, ``pairs.png``, ``report.md``, ``params.json``
    (and ``unreadable.txt`` when verification could not read some images) into ``out_dir``; returns the
    parameters and counts. Images are read, never written."""
    from .embed import load_embeddings, write_csv_atomic
    from .manifest import write_manifest, write_params
    from .report import example_pairs, pairs_figure, write_dedup_report
    from .verify import PLAIN_FILES, embedding_loader, reopen_dataset, verify_pairs

    out_dir = Path(out_dir)
    emb = load_embeddings(embed_dir)
    verifier, dataset = None, None
    if verify:
        # opened once, for verification and pairs.png
        dataset = reopen_dataset(emb, "dedup", f"{PLAIN_FILES}, and no pairs.png", log)
        load = embedding_loader(emb, dataset)
        verifier = lambda candidates: verify_pairs(candidates, load, emb.paths, progress=progress,  # noqa: E731
                                                   desc="dedup: verify")
    result = deduplicate(emb.vectors, emb.hashes, emb.paths, threshold=threshold, k=k, ivf_threshold=ivf_threshold,
                         nprobe=nprobe, nlist=nlist, seed=seed, verifier=verifier,
                         candidate_threshold=candidate_threshold, verify_threshold=verify_threshold)
    kept = np.flatnonzero(result.keep)
    write_manifest(out_dir / "kept.csv", [emb.paths[r] for r in kept], [emb.labels[r] for r in kept], emb.classes)
    write_csv_atomic(out_dir / "removed.csv", ["path"], [(emb.paths[r],) for r in np.flatnonzero(~result.keep)])
    write_csv_atomic(out_dir / "groups.csv", ["group", "path", "kept", "cosine_to_kept"],
                     group_rows(result, emb.vectors, emb.paths))
    write_csv_atomic(out_dir / "edges.csv", ["group", "path_a", "path_b", "how", "cosine", "ncc"],
                     group_edges(result, emb.vectors, emb.paths))
    params = dict(result.params, embeddings=str(embed_dir), seed=int(seed), n_kept=len(kept),
                  n_removed=result.n_removed, n_groups=int(result.group.max(initial=-1) + 1),
                  skipped=len(emb.skipped))
    if verify:
        report_unreadable(out_dir, result.unreadable, params, threshold, "dedup", log)
    measure, scores, cut = ("ncc", result.ncc, verify_threshold) if verify else ("cos", result.similarity, threshold)
    shown = ~np.isnan(scores)
    examples = example_pairs(result.pairs[shown], scores[shown], cut) if figure else []
    if examples and not verify:
        dataset = reopen_dataset(emb, "dedup", "no pairs.png (the lists are still right)", log)
    if dataset is None:  # reopen_dataset said so
        examples = []
    if examples:
        try:
            pairs_figure(out_dir / "pairs.png", dataset, emb.samples, examples, cut, measure)
        except (OSError, ValueError) as exc:  # the data moved since `embed`: the lists are still right
            log(f"[dedup] warning: no pairs.png, the images could not be opened ({exc})")
            examples = []
    write_dedup_report(out_dir, params, result.similarity, "pairs.png" if examples else "",
                       result.ncc[shown] if verify else None)
    write_params(out_dir, "dedup", params)
    rule = (f"{params['n_verified_pairs']} of {params['n_candidates']} candidate pair(s) at cosine >= "
            f"{candidate_threshold} verified at NCC >= {verify_threshold}, {params['verify_ms_per_pair']} ms/pair"
            if verify else f"{params['n_near_pairs']} near pair(s) at cosine >= {threshold}")
    log(f"[dedup] kept {len(kept)} of {params['n']} images, removed {result.n_removed} in {params['n_groups']} "
        f"group(s) ({params['n_exact_pairs']} exact, {rule}); {params['index']['kind']}; report "
        f"{out_dir / 'report.md'}")
    return params
