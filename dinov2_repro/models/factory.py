"""Build the backbone and the projection heads from the config sections `student`, `dino`, `ibot`.

Kept apart from the model classes so that the classes take plain arguments (usable without any config) and
the config -> arguments mapping lives in one place.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

from .dino_head import DINOHead
from .vision_transformer import VARIANTS, DinoVisionTransformer


def backbone_kwargs_from_config(student_cfg: Any, img_size: int, teacher: bool = False) -> Dict[str, Any]:
    """The DinoVisionTransformer keyword arguments for `student_cfg` (the config's `student` section).

    The arch's published size (vit_small 384/12/6, vit_base 768/12/12, vit_large 1024/24/16, vit_giant2
    1536/40/24) is used unless student.embed_dim/depth/num_heads are > 0. LayerScale 0 means no LayerScale.
    The teacher gets no stochastic depth.
    """
    arch = student_cfg.arch
    if arch not in VARIANTS:
        raise ValueError(f"student.arch={arch!r} is not one of {tuple(VARIANTS)}")
    size = dict(VARIANTS[arch])
    for key in ("embed_dim", "depth", "num_heads"):
        value = int(getattr(student_cfg, key))
        if value > 0:
            size[key] = value
    layerscale = float(student_cfg.layerscale)
    return dict(
        img_size=int(img_size),
        patch_size=int(student_cfg.patch_size),
        embed_dim=size["embed_dim"],
        depth=size["depth"],
        num_heads=size["num_heads"],
        mlp_ratio=size.get("mlp_ratio", 4.0),
        qkv_bias=bool(student_cfg.qkv_bias),
        proj_bias=bool(student_cfg.proj_bias),
        ffn_bias=bool(student_cfg.ffn_bias),
        drop_path_rate=0.0 if teacher else float(student_cfg.drop_path_rate),
        drop_path_uniform=bool(student_cfg.drop_path_uniform),
        init_values=layerscale if layerscale > 0 else None,
        ffn_layer=str(student_cfg.ffn_layer),
        num_register_tokens=int(student_cfg.num_register_tokens),
        interpolate_antialias=bool(student_cfg.interpolate_antialias),
        interpolate_offset=float(student_cfg.interpolate_offset),
        attn_backend=str(student_cfg.attn_backend),
    )


def build_backbone_from_config(student_cfg: Any, img_size: int, teacher: bool = False) -> DinoVisionTransformer:
    """DinoVisionTransformer for the config's `student` section; `img_size` sets the pos_embed grid
    (the global crop size, or the pretrained checkpoint's resolution). teacher=True: drop path 0."""
    return DinoVisionTransformer(**backbone_kwargs_from_config(student_cfg, img_size, teacher))


def _head(section: Any, embed_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=embed_dim,
        out_dim=int(section.head_n_prototypes),
        hidden_dim=int(section.head_hidden_dim),
        bottleneck_dim=int(section.head_bottleneck_dim),
        nlayers=int(section.head_nlayers),
        use_bn=bool(section.head_use_bn),
        norm_last_layer=bool(section.head_norm_last_layer),
    )


def build_heads_from_config(cfg: Any, embed_dim: int) -> Dict[str, nn.Module]:
    """{"dino_head": DINOHead} plus {"ibot_head": DINOHead} when ibot.separate_head is true and iBOT is on.

    Tied heads (default): iBOT's patch tokens go through the DINO head (the ibot.head_* keys must then equal
    the dino.head_* keys, which the config validation checks).
    """
    heads: Dict[str, nn.Module] = {"dino_head": _head(cfg.dino, embed_dim)}
    if cfg.ibot.separate_head and cfg.ibot.loss_weight > 0:
        heads["ibot_head"] = _head(cfg.ibot, embed_dim)
    return heads
