"""DINO projection head (Caron et al. 2021, arXiv 2104.14294; DINOv2, Oquab et al. 2023, arXiv 2304.07193).

    x (n, D) -> MLP (nlayers, GELU, optional BN) -> (n, bottleneck) -> L2-normalise -> last_layer -> (n, K)

`last_layer` is a weight-normalised linear map without bias, W = g * V / ||V||_row, so the logits are cosine
similarities scaled by a per-prototype gain g. As in the released DINOv2 code, g starts at 1 and trains (at the
last layer's lr, with weight decay x1, frozen with the last layer); `norm_last_layer=True` fixes g = 1, which is
DINO v1's default (logits bounded in [-1, 1]). It is written as plain parameters + F.normalize instead of the
deprecated torch.nn.utils.weight_norm hook, which FSDP2 and torch.compile handle poorly; the arithmetic is the
hook's (tested). The name `last_layer` is how the optimiser finds it for the first-epoch freeze.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormalizedLinear(nn.Module):
    """y = x W^T with W = g * V / ||V||_row (weight norm over each prototype), no bias. (n, in) -> (n, out).

    ``weight`` is V (out, in); ``weight_g`` is g (out, 1), initialised to 1, absent when ``trainable_gain`` is
    False (g fixed to 1).
    """

    def __init__(self, in_features: int, out_features: int, trainable_gain: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # (K, bottleneck)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1)) if trainable_gain else None  # (K, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, as the reference's last layer (only the row directions matter).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.weight_g is not None:
            nn.init.ones_(self.weight_g)

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (a bf16 parameter under FSDP mixed precision would lose precision in the norm).
        weight = F.normalize(self.weight.float(), p=2, dim=1)
        if self.weight_g is not None:
            weight = weight * self.weight_g.float()
        return F.linear(x, weight.to(self.weight.dtype))

    def extra_repr(self) -> str:
        gain = "trainable" if self.weight_g is not None else "fixed to 1"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, weight_norm_g={gain}"


def build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool = False,
              bias: bool = True) -> nn.Sequential:
    """in_dim -> hidden_dim (-> hidden_dim ...) -> bottleneck_dim, GELU (and BatchNorm) between layers."""
    if nlayers < 1:
        raise ValueError(f"DINO head nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim, bias=bias))
    layers = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    for _ in range(nlayers - 2):
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim, bias=bias)]
    if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim, bias=bias)]
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """(n, in_dim) tokens -> (n, out_dim) prototype logits (cosine similarities)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, use_bn: bool = False, mlp_bias: bool = True, norm_last_layer: bool = False) -> None:
        super().__init__()
        self.mlp = build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.mlp.apply(self._init_weights)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, trainable_gain=not norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (n, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows in fp16
        x = F.normalize(x, p=2, dim=-1, eps=eps)
        return self.last_layer(x)  # (n, K)
