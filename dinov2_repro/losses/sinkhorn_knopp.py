"""Sinkhorn-Knopp teacher targets (Caron et al. 2020, SwAV, arXiv 2006.09882; used by DINOv2, arXiv 2304.07193).

Instead of centering + sharpening, the teacher's scores are turned into an (approximately) equipartitioned
assignment of the global batch to the K prototypes:

    Q = exp(t / tau)^T                           (K, B)   then Q /= sum(Q)          (global sum)
    repeat n times:  Q /= row sums; Q /= K       each prototype gets mass 1/K        (global row sums)
                     Q /= column sums; Q /= B     each sample gets mass 1/B           (B = global batch)
    return (B * Q)^T                             (B, K)   each row sums to 1

Stability: we subtract, per prototype, the max logit over the global batch before exp. That factor is a
per-row scale, which the first row normalisation removes exactly, so the result equals the unshifted
formula while exp never overflows (teacher temps of 0.04 and logits beyond ~3.5 overflow fp32 otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import all_reduce_, at_least_fp32, fp32_no_autocast


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
) -> Tensor:
    """Teacher targets from raw logits.

    teacher_logits: (B_local, K) on this rank (B_local may be 0, e.g. a rank without masked patches; it must
    still call this function because the global sums are collectives). Returns (B_local, K) fp32 targets,
    each row summing to 1, computed over the global batch of all ranks (or this tensor alone without a
    process group).
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects (batch, prototypes) logits, got shape {tuple(teacher_logits.shape)}")
    with fp32_no_autocast(teacher_logits.device):
        logits = at_least_fp32(teacher_logits)  # (B, K)
        n_local, n_prototypes = logits.shape

        # Per-prototype max over the global batch; -inf on a rank that holds no samples.
        if n_local > 0:
            row_max = logits.amax(dim=0)  # (K,)
        else:
            row_max = logits.new_full((n_prototypes,), float("-inf"))
        all_reduce_(row_max, op="max")

        q = torch.exp((logits - row_max) / teacher_temp).t()  # (K, B)

        # One collective for the global mass and the global number of samples.
        totals = torch.stack([q.sum(), logits.new_tensor(float(n_local))])  # (2,)
        all_reduce_(totals)
        total_mass, n_global = totals[0], totals[1]
        q /= total_mass

        for _ in range(n_iterations):
            row_sums = q.sum(dim=1, keepdim=True)  # (K, 1), mass of each prototype
            all_reduce_(row_sums)
            q /= row_sums
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True)  # (1, B), each sample's mass: local, no collective needed
            q /= n_global

        q *= n_global  # columns sum to 1: each sample's targets are a distribution
        return q.t()  # (B, K)
