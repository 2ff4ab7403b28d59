"""``curate decontaminate``: remove from a pretraining set every image that is a copy of an evaluation image (the
DINOv2 step, Oquab et al. 2023, section 3: no benchmark test or validation image may be seen in pretraining).

A pretraining image is removed when its decoded pixels equal an evaluation image's (sha1) or when its nearest
evaluation image (Faiss, inner product of unit-norm embeddings) has cosine similarity >= ``threshold``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

from .dedup import DEFAULT_THRESHOLD
from .embed import Embeddings, embed_dataset, load_embeddings, write_csv_atomic
from .faiss_index import DEFAULT_NPROBE, IVF_THRESHOLD, build_index, knn


def contaminated(pretrain: Embeddings, evaluation: Embeddings, threshold: float = DEFAULT_THRESHOLD,
                 ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, seed: int = 0):
    """(removed (N,) bool, nearest evaluation row (N,), its cosine (N,), exact (N,) bool, index parameters)."""
    n = len(pretrain)
    by_hash = {h: row for row, h in enumerate(evaluation.hashes) if h}
    exact_row = np.array([by_hash.get(h, -1) if h else -1 for h in pretrain.hashes], dtype=np.int64).reshape(n)
    if len(evaluation) and n:
        index, params = build_index(evaluation.vectors, ivf_threshold=ivf_threshold, nprobe=nprobe, seed=seed)
        sims, ids = knn(index, pretrain.vectors, 1)
        nearest, cosine = ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)
    else:
        nearest, cosine, params = np.full(n, -1, np.int64), np.full(n, -2.0, np.float32), dict(kind="none")
    exact = exact_row >= 0
    nearest = np.where(exact, exact_row, nearest)
    cosine = np.where(exact, np.float32(1.0), cosine)
    return exact | (cosine >= threshold), nearest, cosine, exact, params


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


def run_decontaminate(embed_dir, against, out_dir, *, threshold: float = DEFAULT_THRESHOLD,
                      ivf_threshold: int = IVF_THRESHOLD, nprobe: int = DEFAULT_NPROBE, seed: int = 0,
                      log=print) -> Dict[str, Any]:
    """Write ``kept.csv`` (manifest for train), ``removed.csv`` (each removed image with its evaluation twin) and
    ``params.json`` into ``out_dir``; returns the parameters and counts."""
    from .manifest import write_manifest, write_params

    out_dir = Path(out_dir)
    pretrain = load_embeddings(embed_dir)
    evaluation = evaluation_embeddings(against, pretrain, out_dir, log)
    removed, nearest, cosine, exact, index = contaminated(pretrain, evaluation, threshold, ivf_threshold, nprobe,
                                                          seed)
    kept = np.flatnonzero(~removed)
    write_manifest(out_dir / "kept.csv", [pretrain.paths[r] for r in kept], [pretrain.labels[r] for r in kept],
                   pretrain.classes)
    write_csv_atomic(out_dir / "removed.csv", ["path", "evaluation_path", "cosine", "exact"],
                     [(pretrain.paths[r], evaluation.paths[nearest[r]], round(float(cosine[r]), 4), int(exact[r]))
                      for r in np.flatnonzero(removed)])
    params = dict(embeddings=str(embed_dir), against=str(against), threshold=float(threshold), index=index,
                  n=len(pretrain), n_evaluation=len(evaluation), n_kept=len(kept), n_removed=int(removed.sum()),
                  n_exact=int(exact.sum()))
    write_params(out_dir, "decontaminate", params)
    log(f"[decontaminate] kept {len(kept)} of {len(pretrain)} pretraining images; removed {params['n_removed']} "
        f"copies of {len(evaluation)} evaluation images ({params['n_exact']} exact) -> {out_dir / 'removed.csv'}")
    return params
