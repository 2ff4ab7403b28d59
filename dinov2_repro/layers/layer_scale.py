"""LayerScale (Touvron et al. 2021, "Going deeper with Image Transformers", arXiv 2103.17239).

Multiplies a residual branch by a learned per-channel vector `gamma`, initialised small (1e-5 when training
from scratch) so each block starts close to the identity. The parameter is named `gamma` because the
published DINOv2 checkpoints store it as `blocks.{i}.ls1.gamma` / `ls2.gamma`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """y = x * gamma, gamma of shape (dim,) initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
