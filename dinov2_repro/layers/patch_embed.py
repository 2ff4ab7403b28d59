"""Patch embedding: cut the image into non-overlapping p x p patches and project each to `embed_dim`.

A stride-p convolution with kernel p is exactly a linear map per patch. Named `patch_embed.proj` as in the
published checkpoints.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) (or (B, H/p, W/p, D) with flatten_embedding=False)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(img_size, int) or not isinstance(patch_size, int):
            raise TypeError(f"img_size and patch_size must be ints, got img_size={img_size!r}, "
                            f"patch_size={patch_size!r}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        patch = self.patch_size[0]
        if height % patch or width % patch:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {patch}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, H/p * W/p, D), row-major over the patch grid
        x = self.norm(x)
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)
        return x
