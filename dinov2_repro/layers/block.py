"""Pre-norm transformer block with LayerScale and stochastic depth (the DINOv2 / CaiT block).

    x = x + drop_path(ls1(attn(norm1(x))))
    x = x + drop_path(ls2(mlp(norm2(x))))

Every sub-layer is injected (attn_class, ffn_layer, norm_layer, act_layer), timm style. Stochastic depth:
- eval mode: never drops (deterministic);
- training with rate <= 0.1: per-sample DropPath;
- training with rate > 0.1: the batch-subset trick (branch computed on the kept samples only), same expectation.
A list of tensors (crops of different sizes) is processed one dense tensor at a time: no padding, one
attention call per size.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

from torch import Tensor, nn

from .attention import Attention
from .drop_path import DropPath, drop_add_residual_stochastic_depth
from .layer_scale import LayerScale
from .mlp import Mlp

# Above this rate the batch-subset implementation saves more compute than its gather/scatter costs.
BATCH_SUBSET_MIN_DROP_RATE = 0.1


class Block(nn.Module):
    """One transformer block; (B, N, D) -> (B, N, D), or a list of such tensors -> list."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop)
        # init_values None or 0 means "no LayerScale": no ls*.gamma keys, as in models trained without it.
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             drop=drop, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        self.sample_drop_ratio = drop_path

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward_tensor(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > BATCH_SUBSET_MIN_DROP_RATE:
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, self.ffn_residual, self.sample_drop_ratio)
        else:  # DropPath modules are identities in eval mode or at rate 0
            x = x + self.drop_path1(self.attn_residual(x))
            x = x + self.drop_path2(self.ffn_residual(x))
        return x

    def forward(self, x: Union[Tensor, List[Tensor]]) -> Union[Tensor, List[Tensor]]:
        if isinstance(x, (list, tuple)):
            return [self._forward_tensor(t) for t in x]
        return self._forward_tensor(x)
