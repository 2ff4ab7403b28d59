"""SwiGLU feed-forward network (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202).

out = w3(silu(x W1) * (x W2)). W1 and W2 are packed in one Linear `w12` (first half = gate W1, second half = W2),
which is how the published DINOv2 ViT-g/14 stores them (`mlp.w12`, `mlp.w3`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_features(mlp_hidden_features: int) -> int:
    """DINOv2's hidden size for SwiGLU given the MLP hidden size: 2/3 of it, rounded up to a multiple of 8.

    Two thirds keeps the parameter count of a 2-matrix MLP with 3 matrices; ViT-g: 4 * 1536 = 6144 -> 4096.
    """
    return (int(mlp_hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with exactly `hidden_features` hidden units. (B, N, in) -> (B, N, out)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,  # unused: the gate is always SiLU
        drop: float = 0.0,  # unused, kept for the common ffn_layer signature
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU whose hidden size is derived from the MLP hidden size by DINOv2's 2/3-and-round-to-8 rule.

    Named after the reference's class so configs read the same; it is plain PyTorch (no xFormers kernel). The
    reference maps both ffn_layer="swiglu" and "swiglufused" to this class, which is what makes ViT-g/14's
    shapes w12 (8192, 1536) and w3 (1536, 4096).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        hidden_features = swiglu_hidden_features(hidden_features or in_features)
        super().__init__(in_features, hidden_features, out_features, act_layer, drop, bias)
