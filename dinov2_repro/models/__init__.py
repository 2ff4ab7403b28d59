"""Models: the DINOv2 ViT backbone (and, from the objectives side, the projection heads)."""

from .vision_transformer import (
    DinoVisionTransformer,
    build_backbone,
    resize_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)
