"""Weighted k-NN classifier on frozen features (DINO, Caron et al. 2021, arXiv 2104.14294, section 4.1 / eval_knn).

Features are L2-normalised CLS tokens; similarity is the cosine (a dot product). Each of the k nearest training
samples votes for its class with weight exp(sim / T), T = 0.07; the class scores, normalised to sum to 1, are the
predicted probabilities. k is chosen on the validation split among {10, 20, 100, 200} (clipped to the training
size); the test split is only scored with that k.

Backends: plain torch in query chunks (default, exact), or faiss (``IndexFlatIP``, exact too) when installed.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def effective_ks(ks: Sequence[int], n_train: int) -> List[int]:
    """Requested ks clipped to the training size, deduplicated, ascending."""
    return sorted({min(int(k), n_train) for k in ks})


def _topk_torch(train: Tensor, query: Tensor, k: int, chunk_size: int):
    for start in range(0, query.shape[0], chunk_size):
        sims = query[start:start + chunk_size] @ train.T  # (chunk, N_train) cosine similarities
        yield sims.topk(k, dim=1)


def _topk_faiss(train: Tensor, query: Tensor, k: int, chunk_size: int):
    import faiss  # optional dependency

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.float().cpu().contiguous().numpy())
    for start in range(0, query.shape[0], chunk_size):
        sims, idx = index.search(query[start:start + chunk_size].float().cpu().contiguous().numpy(), k)
        yield torch.from_numpy(sims).to(query.device), torch.from_numpy(idx).to(query.device)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _search(backend: str):
    """The top-k generator of ``backend`` ("torch", "faiss" or "auto": faiss when installed)."""
    if backend == "auto":
        backend = "faiss" if _faiss_available() else "torch"
    if backend == "faiss" and not _faiss_available():
        raise ImportError("knn.backend=faiss but faiss is not installed (pip install faiss-cpu), or use torch")
    return _topk_faiss if backend == "faiss" else _topk_torch


@torch.no_grad()
def nearest_neighbours(reference: Tensor, query: Tensor, k: int = 1, backend: str = "auto",
                       chunk_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """(cosine (N_query, k), reference index (N_query, k)) of each query row's ``k`` most similar reference rows;
    both sets are L2-normalised here. ``k`` is clipped to the reference size."""
    reference = F.normalize(reference.float(), dim=1)
    query = F.normalize(query.float().to(reference.device), dim=1)
    k = max(1, min(int(k), reference.shape[0]))
    parts = list(_search(backend)(reference, query, k, chunk_size))
    if not parts:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).long()


@torch.no_grad()
def knn_probabilities(train_features: Tensor, train_labels: Tensor, query_features: Tensor, ks: Sequence[int],
                      n_classes: int, temperature: float = 0.07, chunk_size: int = 1024,
                      backend: str = "torch") -> Dict[int, Tensor]:
    """{k: class probabilities (N_query, C)} of the weighted k-NN vote, for every k in ``ks`` (<= N_train)."""
    search = _search(backend)
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float().to(train.device), dim=1)
    labels = train_labels.to(train.device)
    ks = [int(k) for k in ks]
    if max(ks) > train.shape[0]:
        raise ValueError(f"k = {max(ks)} exceeds the {train.shape[0]} training samples; clip it (effective_ks)")
    chunks: Dict[int, List[Tensor]] = {k: [] for k in ks}
    for sims, idx in search(train, query, max(ks), chunk_size):  # both (chunk, max_k), most similar first
        weights = (sims / temperature).exp()
        neighbour_labels = labels[idx]
        for k in ks:
            votes = torch.zeros(sims.shape[0], n_classes, device=sims.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            chunks[k].append(votes / votes.sum(1, keepdim=True))
    return {k: torch.cat(parts).cpu() for k, parts in chunks.items()}


def select_k(val_probs: Dict[int, Tensor], val_labels: Tensor) -> Tuple[int, Dict[int, float]]:
    """The k with the best validation accuracy (ties -> the smaller k) and every k's accuracy."""
    accuracy = {k: float((p.argmax(1) == val_labels.cpu()).float().mean()) for k, p in val_probs.items()}
    best = max(sorted(accuracy), key=lambda k: accuracy[k])  # max keeps the first (smallest) of equal values
    return best, accuracy
