"""iBOT masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer",
arXiv 2111.07832; as used by DINOv2, arXiv 2304.07193).

The student sees masked global crops; for every masked patch token its head output must match the teacher's
target for the same patch of the *unmasked* view. Per image, the cross-entropy is averaged over that image's
masked tokens (masks_weight = 1 / #masked tokens of the image), then summed over images and divided by the
number of global-crop images (an unmasked image contributes 0):

    loss = 1 / n_images * sum_m masks_weight[m] * ( -sum_k t[m, k] log softmax(s[m] / 0.1)_k )

Teacher targets: softmax centering with its own EMA center (the mean over all ranks' masked tokens), or
Sinkhorn-Knopp over the masked tokens of the global batch (token count all-reduced).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino_clstoken_loss import SoftmaxCenter
from .distributed import at_least_fp32, fp32_no_autocast
from .sinkhorn_knopp import sinkhorn_knopp


def masks_weight_from_masks(masks: Tensor) -> Tensor:
    """masks (n_images, N) bool -> (M,) weights 1 / #masked tokens of each masked token's image, in the order of
    `masks.flatten().nonzero()` (the collate's mask_indices_list order)."""
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).float()  # (n_images,)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]  # (M,)


class iBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy with per-image weighting (see the module docstring)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCenter(patch_out_dim, center_momentum)

    @property
    def center(self) -> Tensor:
        return self.centering.center

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_logits: Tensor, teacher_temp: float) -> Tensor:
        """(M, K) raw teacher logits of the masked patches -> (M, K) centered, sharpened targets."""
        return self.centering.softmax_centered(teacher_patch_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_patch_logits: Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> Tensor:
        """(M, K) raw teacher logits -> (M, K) Sinkhorn-Knopp targets over all ranks' masked tokens."""
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """Start the EMA update with the mean of this step's masked-token logits (M, K) over all ranks."""
        self.centering.start_update(teacher_patch_logits)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        self.centering.finish_update()

    def state_snapshot(self) -> Dict[str, Tensor]:
        """Everything this loss carries between steps (the center), copied; see `restore_state`."""
        return {"center": self.centering.snapshot()}

    def restore_state(self, snapshot: Dict[str, Tensor]) -> None:
        self.centering.restore(snapshot["center"])

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks_weight: Tensor,
                n_images: int) -> Tensor:
        """student_patch_logits (M, K), teacher_patch_probs (M, K), masks_weight (M,) -> scalar fp32 loss.

        n_images: number of global-crop images in the (local) batch, masked or not (the denominator).
        """
        n_tokens = student_patch_logits.shape[:1]
        if student_patch_logits.shape != teacher_patch_probs.shape or masks_weight.shape != n_tokens:
            raise ValueError(f"iBOTPatchLoss shapes disagree: student {tuple(student_patch_logits.shape)}, teacher "
                             f"{tuple(teacher_patch_probs.shape)}, masks_weight {tuple(masks_weight.shape)}")
        if n_images < 1:
            raise ValueError(f"iBOTPatchLoss: n_images must be >= 1, got {n_images}")
        with fp32_no_autocast(student_patch_logits.device):
            log_p = F.log_softmax(at_least_fp32(student_patch_logits) / self.student_temp, dim=-1)  # (M, K)
            # A product summed over K, as the reference: the einsum form ran as M batched fp32 GEMVs that took
            # ~20 ms of a 183 ms ViT-S/14 step on an H200 (docs/benchmarks.md, GPU profile).
            token_ce = -(at_least_fp32(teacher_patch_probs) * log_p).sum(dim=-1)  # (M,)
            return (token_ce * at_least_fp32(masks_weight)).sum() / n_images
