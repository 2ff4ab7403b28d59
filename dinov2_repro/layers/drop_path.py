"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv 1603.09382).

Two implementations with the same expectation:
- `DropPath`: per-sample Bernoulli mask on the residual branch, scaled by 1/keep_prob (timm style). The branch
  is still computed for dropped samples.
- `drop_add_residual_stochastic_depth`: the DINOv2 "batch subset" trick. Pick max(floor(B*(1-p)), 1) samples,
  compute the branch only on them, and add it back scaled by B/subset. Each sample is kept with probability
  subset/B, so E[added residual] = residual exactly, and the dropped samples cost no compute; worth it when p is
  large (DINOv2 uses it for p > 0.1).
Both are identities in eval mode.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Zero the whole residual of each sample with probability `drop_prob`, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample, broadcast over tokens/channels
    keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    """Per-sample stochastic depth on a residual branch (identity in eval mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_add_residual_stochastic_depth(
    x: Tensor, residual_func: Callable[[Tensor], Tensor], sample_drop_ratio: float
) -> Tensor:
    """x + stochastic-depth(residual_func(x)), computing the branch only on the kept samples.

    x: (B, N, D). A random subset of size max(floor(B * (1 - p)), 1) is kept; its residual is added back with
    weight B / subset, so the expected output equals x + residual_func(x) sample by sample.
    """
    batch_size = x.shape[0]
    subset_size = max(int(batch_size * (1.0 - sample_drop_ratio)), 1)
    kept = torch.randperm(batch_size, device=x.device)[:subset_size]
    residual = residual_func(x[kept])  # (subset, N, D)
    scale = batch_size / subset_size
    # index_add (not in-place on x) so autograd sees a fresh tensor; flatten to (B, N*D) for one kernel.
    out = torch.index_add(x.flatten(1), 0, kept, residual.to(dtype=x.dtype).flatten(1), alpha=scale)
    return out.view_as(x)
