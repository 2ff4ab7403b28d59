"""``curate decontaminate``: remove from a pretraining set every image that is a copy of an evaluation image (the
DINOv2 step, Oquab et al. 2023, section 3: no benchmark test or validation image may be seen in pretraining).

A pretraining image is removed when its decoded pixels equal an evaluation image's (sha1), or when it is a near copy
of one. With verification (the default, as in `dedup`), its ``k`` nearest evaluation images (Faiss, inner product
of unit-norm embeddings) at cosine >= ``candidate_threshold`` are candidates, and a candidate whose aligned NCC
(`verify.aligned_ncc`) is >= ``verify_threshold`` makes it a copy (a candidate whose images cannot be read is
decided by ``threshold`` alone). Without verification, its nearest evaluation image at cosine >= ``threshold``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from .dedup import DEFAULT_CANDIDATE_K, DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_THRESHOLD, near_edges
from .embed import Embeddings, embed_dataset, load_embeddings, write_csv_atomic
from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD, build_index, knn
from .verify import DEFAULT_VERIFY_THRESHOLD, Verification, report_unreadable


def contaminated(pretrain: Embeddings, evaluation: Embeddings, threshold: float = DEFAULT_THRESHOLD,
                 ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, seed: int = 0, *, k: int = 0,
                 verifier: Optional[Callable[[np.ndarray], Verification]] = None,
                 candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                 verify_threshold: float = DEFAULT_VERIFY_THRESHOLD):
    """(removed (N,) bool, evaluation twin (N,), its cosine (N,), exact (N,) bool, parameters and counts, its aligned
    NCC (N,) float32, NaN when not measured). ``verifier(pairs (P, 2) of (pretraining row, evaluation row))``
    returns their `Verification`; None: the nearest evaluation image at cosine >= ``threshold`` (``k`` 0 means 1
    then, `DEFAULT_CANDIDATE_K` with a verifier). The twin is the best-NCC verified candidate of a removed image,
    else its nearest evaluation image."""
    n = len(pretrain)
    k = int(k) or (1 if verifier is None else DEFAULT_CANDIDATE_K)
    by_hash = {h: row for row, h in enumerate(evaluation.hashes) if h}
    exact_row = np.array([by_hash.get(h, -1) if h else -1 for h in pretrain.hashes], dtype=np.int64).reshape(n)
    if len(evaluation) and n:
        index, params = build_index(evaluation.vectors, ivf_threshold=ivf_threshold, nprobe=nprobe, seed=seed)
        sims, ids = knn(index, pretrain.vectors, k)
    else:
        sims, ids, params = np.full((n, 1), -2.0, np.float32), np.full((n, 1), -1, np.int64), dict(kind="none")
    # the (pretraining row, evaluation row) pairs of the k-NN table, decided as dedup decides its pairs
    valid = ids >= 0
    pairs = np.stack([np.nonzero(valid)[0], ids[valid]], axis=1)
    near, pair_ncc, verification, counts = near_edges(pairs, sims[valid], verifier, threshold, candidate_threshold,
                                                      verify_threshold)
    copy, ncc = np.zeros(ids.shape, bool), np.full(ids.shape, np.nan, np.float32)
    copy[valid], ncc[valid] = near, pair_ncc
    params = dict(index=params, k=k, verify=verifier is not None, **counts)
    if verification is not None:
        params.update(candidate_threshold=float(candidate_threshold), verify_threshold=float(verify_threshold),
                      unreadable=verification.unreadable)
    # the twin: the copy with the best NCC (or cosine), else the nearest evaluation image
    rank = np.where(copy, np.where(np.isnan(ncc), sims, ncc) + 2.0, sims - 4.0)
    best = rank.argmax(axis=1)
    pick = np.arange(n), best
    exact = exact_row >= 0
    nearest = np.where(exact, exact_row, ids[pick].astype(np.int64))
    cosine = np.where(exact, np.float32(1.0), sims[pick].astype(np.float32))
    score = np.where(exact, np.float32(np.nan), ncc[pick])
    return exact | copy.any(axis=1), nearest, cosine, exact, params, score


def evaluation_embeddings(against, pretrain: Embeddings, out_dir: Path, log=print) -> Embeddings:
    """``against`` as embeddings: an ``embed`` folder as it is, else a dataset embedded (into ``out_dir/against``)
    with the backbone and input size of the pretraining embeddings, so the two are comparable."""
    against = Path(against)
    if (against / "params.json").is_file() and (against / "shards").is_dir():
        evaluation = load_embeddings(against)
        if evaluation.params["backbone"] != pretrain.params["backbone"]:
            raise ValueError(f"{against} was embedded with another backbone than the pretraining set: embed both "
                             f"with the same SPEC")
        return evaluation
    spec = pretrain.params["backbone"]["spec"]
    crop = int(pretrain.params["transform"]["crop_size"])
    log(f"[decontaminate] embedding the evaluation data {against} with {spec}")
    embed_dataset(str(against), out_dir / "against", spec, crop_size=crop, rank=0, world_size=1, log=log)
    return load_embeddings(out_dir / "against")


def run_decontaminate(embed_dir, against, out_dir, *, threshold: float = DEFAULT_THRESHOLD, k: int = 0,
                      ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, seed: int = 0,
                      verify: bool = True, candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                      verify_threshold: float = DEFAULT_VERIFY_THRESHOLD, progress: bool = True,
                      log=print) -> Dict[str, Any]:
    """Write ``kept.csv`` (manifest for train), ``removed.csv`` (each removed image with its evaluation twin, their
    cosine and NCC), ``params.json`` (and ``unreadable.txt`` when verification could not read some images) into
    ``out_dir``; returns the parameters and counts."""
    from .manifest import write_manifest, write_params

    out_dir = Path(out_dir)
    pretrain = load_embeddings(embed_dir)
    evaluation = evaluation_embeddings(against, pretrain, out_dir, log)
    verifier = verification_of(pretrain, evaluation, progress, log) if verify else None
    removed, nearest, cosine, exact, info, ncc = contaminated(
        pretrain, evaluation, threshold, ivf_threshold, nprobe, seed, k=k, verifier=verifier,
        candidate_threshold=candidate_threshold, verify_threshold=verify_threshold)
    kept = np.flatnonzero(~removed)
    write_manifest(out_dir / "kept.csv", [pretrain.paths[r] for r in kept], [pretrain.labels[r] for r in kept],
                   pretrain.classes)
    write_csv_atomic(out_dir / "removed.csv", ["path", "evaluation_path", "cosine", "exact", "ncc"],
                     [(pretrain.paths[r], evaluation.paths[nearest[r]], round(float(cosine[r]), 4), int(exact[r]),
                       "" if np.isnan(ncc[r]) else round(float(ncc[r]), 4)) for r in np.flatnonzero(removed)])
    params = dict(embeddings=str(embed_dir), against=str(against), threshold=float(threshold), **info,
                  n=len(pretrain), n_evaluation=len(evaluation), n_kept=len(kept), n_removed=int(removed.sum()),
                  n_exact=int(exact.sum()))
    if verify:
        report_unreadable(out_dir, info["unreadable"], params, threshold, "decontaminate", log)
    write_params(out_dir, "decontaminate", params)
    rule = (f"{info['n_verified_pairs']} of {info['n_candidates']} candidate pair(s) verified at NCC >= "
            f"{verify_threshold}" if verify else f"cosine >= {threshold}")
    log(f"[decontaminate] kept {len(kept)} of {len(pretrain)} pretraining images; removed {params['n_removed']} "
        f"copies of {len(evaluation)} evaluation images ({params['n_exact']} exact; {rule}) -> "
        f"{out_dir / 'removed.csv'}")
    return params


def verification_of(pretrain: Embeddings, evaluation: Embeddings, progress: bool, log):
    """The verifier of `contaminated`: (pretraining row, evaluation row) pairs -> `verify.verify_pairs` over both
    sets' images, each decoded through its own dataset."""
    from .verify import embedding_loader, reopen_dataset, verify_pairs

    n = len(pretrain)
    load_pretrain, load_evaluation = (embedding_loader(emb, reopen_dataset(emb, "decontaminate", log=log))
                                      for emb in (pretrain, evaluation))
    names = list(pretrain.paths) + list(evaluation.paths)

    def load(row: int):
        return load_pretrain(row) if row < n else load_evaluation(row - n)

    return lambda pairs: verify_pairs(np.asarray(pairs) + [0, n], load, names, progress=progress,
                                      desc="decontaminate: verify")
