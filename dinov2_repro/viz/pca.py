"""PCA of patch features shown as RGB (the DINOv2 paper's figure 1 recipe, Oquab et al. 2023).

1. The last block's normed patch tokens of one image, or of a set of images jointly, are centred and projected on
   their first principal component; patches above ``threshold`` on it are the foreground.
2. A second PCA on the foreground patches alone gives three components, min-max scaled to [0, 1] jointly over
   the set and shown as RGB; background patches are black.

Signs of principal components are arbitrary; they are fixed so that the same input gives the same picture: each
component's largest-magnitude loading is made positive, except the first of step 1, whose sign puts the image
border (mostly background in scans and photos alike) on the low side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import Tensor


@torch.no_grad()
def patch_tokens(model, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) -> the last block's normed patch tokens (B, h, w, D) (registers and CLS left out)."""
    (tokens,) = model.get_intermediate_layers(images, n=1, reshape=True, norm=True)  # (B, D, h, w)
    return tokens.permute(0, 2, 3, 1).float()


def principal_axes(x: Tensor, k: int) -> Tensor:
    """x (M, D) centred -> (k, D) orthonormal principal directions, each with its largest loading positive."""
    _, _, vt = torch.linalg.svd(x.double(), full_matrices=False)
    axes = vt[:k]
    if axes.shape[0] < k:  # fewer samples or features than components: pad with zero directions
        axes = torch.cat([axes, axes.new_zeros(k - axes.shape[0], axes.shape[1])])
    largest = axes.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(axes.gather(1, largest))
    return (axes * torch.where(signs == 0, torch.ones_like(signs), signs)).float()


def border_mask(h: int, w: int) -> Tensor:
    """(h, w) bool: the outermost ring of patches."""
    mask = torch.ones(h, w, dtype=torch.bool)
    if h > 2 and w > 2:
        mask[1:-1, 1:-1] = False
    return mask


@dataclass
class PcaView:
    """rgb: one (h_i, w_i, 3) float image in [0, 1] per input; foreground: one (h_i, w_i) bool mask per input;
    first: one (h_i, w_i) map of the first component (step 1) per input."""

    rgb: List[Tensor]
    foreground: List[Tensor]
    first: List[Tensor]


def pca_rgb(tokens: Sequence[Tensor], threshold: float = 0.0, remove_background: bool = True) -> PcaView:
    """Patch tokens of one or more images, each (h_i, w_i, D) (sizes may differ), analysed jointly -> `PcaView`.

    ``threshold`` is on the first component in units of its standard deviation over all patches (0: above average).
    """
    shapes = [t.shape[:2] for t in tokens]
    flat = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in tokens])  # (M, D)
    centred = flat - flat.mean(0)
    first = centred @ principal_axes(centred, 1)[0]  # (M,)
    borders = torch.cat([border_mask(h, w).flatten() for h, w in shapes])
    if (~borders).any() and first[borders].mean() > first[~borders].mean():
        first = -first  # the border is background: keep it on the low side
    first = first / first.std().clamp_min(1e-12)
    keep = first > threshold if remove_background else torch.ones_like(first, dtype=torch.bool)
    if int(keep.sum()) < 3:  # too few foreground patches to fit three components: show everything
        keep = torch.ones_like(keep)
    fg = centred[keep] - centred[keep].mean(0)
    projected = (centred - centred[keep].mean(0)) @ principal_axes(fg, 3).T  # (M, 3)
    low, high = projected[keep].min(0).values, projected[keep].max(0).values
    rgb = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1) * keep[:, None]
    sizes = [h * w for h, w in shapes]
    return PcaView(rgb=[part.reshape(h, w, 3) for part, (h, w) in zip(rgb.split(sizes), shapes)],
                   foreground=[part.reshape(h, w) for part, (h, w) in zip(keep.split(sizes), shapes)],
                   first=[part.reshape(h, w) for part, (h, w) in zip(first.split(sizes), shapes)])


def pca_rgb_each(tokens: Sequence[Tensor], threshold: float = 0.0, remove_background: bool = True) -> PcaView:
    """`pca_rgb` of every image on its own (each image's colours then use its own components)."""
    views = [pca_rgb([t], threshold, remove_background) for t in tokens]
    return PcaView(rgb=[v.rgb[0] for v in views], foreground=[v.foreground[0] for v in views],
                   first=[v.first[0] for v in views])
