"""Self-supervised objectives of DINOv2: DINO [CLS] loss, iBOT masked-patch loss, KoLeo, Sinkhorn-Knopp."""

from .dino_clstoken_loss import DINOLoss, SoftmaxCenter, cross_entropy_matrix
from .ibot_patch_loss import iBOTPatchLoss, masks_weight_from_masks
from .koleo_loss import KoLeoLoss
from .sinkhorn_knopp import sinkhorn_knopp

__all__ = ["DINOLoss", "KoLeoLoss", "SoftmaxCenter", "cross_entropy_matrix", "iBOTPatchLoss",
           "masks_weight_from_masks", "sinkhorn_knopp"]
