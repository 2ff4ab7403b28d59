"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search", arXiv 1806.03198;
used by DINOv2, arXiv 2304.07193, Sec. 4).

Kozachenko-Leonenko differential-entropy estimator: push every L2-normalised feature away from its nearest
neighbour in the batch,  L = -1/n sum_i log(||x_i - x_nn(i)|| + eps).
Applied to the student's global-crop CLS tokens (after the final norm, before the head), one global view at a
time (the two views of one image are not pushed apart); the meta-architecture sums the per-view values.

Always computed in fp32 with autocast off: in fp16 the eps underflows and a duplicate gives -log(0) = inf.
The distance is torch's pairwise_distance, ||x - y + eps||, whose gradient stays finite for exact duplicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import at_least_fp32, fp32_no_autocast


class KoLeoLoss(nn.Module):
    """(n, D) features -> scalar -mean log(nearest-neighbour distance + eps); 0 for n < 2."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    @staticmethod
    @torch.no_grad()
    def nearest_neighbours(x: Tensor) -> Tensor:
        """x (n, D) L2-normalised -> (n,) index of each row's nearest other row (max dot product)."""
        dots = x @ x.t()  # (n, n), cosine similarities in [-1, 1]
        dots.fill_diagonal_(-2.0)  # below any real similarity: a point is never its own neighbour
        return dots.argmax(dim=1)

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (batch, dim) features, got shape {tuple(features.shape)}")
        if features.shape[0] < 2:  # no neighbour: 0, still attached to the graph so backward() works
            return at_least_fp32(features).sum() * 0.0
        with fp32_no_autocast(features.device):
            x = F.normalize(at_least_fp32(features), p=2, dim=-1, eps=self.eps)  # (n, D)
            neighbour = self.nearest_neighbours(x)  # (n,)
            distances = F.pairwise_distance(x, x[neighbour], p=2, eps=self.eps)  # (n,)
            return -torch.log(distances + self.eps).mean()
