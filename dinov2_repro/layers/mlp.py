"""Transformer feed-forward network: Linear -> GELU -> Linear (Vaswani et al. 2017; ViT, Dosovitskiy et al. 2021).

Parameter names `fc1` / `fc2` match the published DINOv2 checkpoints.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn


class Mlp(nn.Module):
    """(B, N, in) -> fc1 -> act -> drop -> fc2 -> drop -> (B, N, out)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
