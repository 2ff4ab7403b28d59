"""Small building blocks of the ViT backbone, each injectable into `Block` (timm style)."""

from .attention import ATTN_BACKENDS, Attention, resolve_attn_backend
from .block import Block
from .drop_path import DropPath, drop_add_residual_stochastic_depth, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "resolve_attn_backend",
    "swiglu_hidden_features",
]
