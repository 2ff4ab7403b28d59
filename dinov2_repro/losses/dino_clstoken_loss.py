"""DINO loss on the [CLS] token (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers", arXiv 2104.14294; DINOv2 recipe, Oquab et al. 2023, arXiv 2304.07193).

Cross-entropy between teacher targets and the student's sharpened distribution, -sum_k t_k log softmax(s/0.1)_k,
averaged over the batch, then averaged over the view pairs:
  - every student crop (globals and locals) against every teacher global crop,
  - except a global crop against itself (the teacher never supervises the same view).
With 2 globals and n locals that is 2n + 2 pairs (18 for 8 locals); with 0 locals only the 2 cross pairs.

Teacher targets come from softmax centering (EMA center of the raw teacher logits, momentum 0.9, averaged
over all ranks) or from Sinkhorn-Knopp (see `sinkhorn_knopp.py`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_reduce_, at_least_fp32, fp32_no_autocast, wait
from .sinkhorn_knopp import sinkhorn_knopp


class SoftmaxCenter(nn.Module):
    """EMA center of teacher logits, c <- m c + (1 - m) mean(t), the mean taken over every rank's samples.

    `start_update(t)` launches the (asynchronous) all-reduce of [sum over samples, count]; `finish_update()`
    waits for it and applies the EMA. The meta-architecture starts the update right after the teacher forward
    and finishes it at the end of the training step, so the reduction overlaps the student forward and no
    pending state survives the step (checkpoints always see a settled center). A step with no samples on any
    rank leaves the center unchanged.
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))  # (1, K), fp32; saved in state_dict
        self._pending: Optional[Tuple[Tensor, object]] = None

    @torch.no_grad()
    def start_update(self, teacher_logits: Tensor) -> None:
        """teacher_logits: (n, K) raw logits (before temperature and centering) of this rank."""
        self.finish_update()  # never drop an earlier update
        logits = teacher_logits.detach().float().reshape(-1, self.center.shape[-1])
        stats = torch.cat([logits.sum(dim=0), logits.new_tensor([float(logits.shape[0])])])  # (K + 1,)
        handle = all_reduce_(stats, async_op=True)
        self._pending = (stats, handle)

    @torch.no_grad()
    def finish_update(self) -> None:
        if self._pending is None:
            return
        stats, handle = self._pending
        self._pending = None
        wait(handle)
        count = stats[-1]
        batch_mean = stats[:-1] / count.clamp(min=1.0)  # (K,)
        updated = self.center * self.momentum + batch_mean.unsqueeze(0) * (1.0 - self.momentum)
        # torch.where, not `if count > 0`: no host sync.
        self.center.copy_(torch.where(count > 0, updated, self.center))

    @torch.no_grad()
    def snapshot(self) -> Tensor:
        """A copy of the settled center, for `restore` (a step whose update is dropped must not move it)."""
        self.finish_update()
        return self.center.clone()

    @torch.no_grad()
    def restore(self, snapshot: Tensor) -> None:
        self._pending = None  # an update started after the snapshot is dropped with the step
        self.center.copy_(snapshot)

    @torch.no_grad()
    def softmax_centered(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(n, K) logits -> (n, K) fp32 targets softmax((t - c) / teacher_temp) with the current center."""
        self.finish_update()
        with fp32_no_autocast(teacher_logits.device):
            return F.softmax((at_least_fp32(teacher_logits) - self.center) / teacher_temp, dim=-1)


def cross_entropy_matrix(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """Batch-mean cross-entropy of every (student crop, teacher crop) pair.

    student_logits (S, B, K), teacher_probs (T, B, K) -> (S, T) with entry [s, t] =
    mean_b -sum_k teacher_probs[t, b, k] * log_softmax(student_logits[s, b] / student_temp)_k.
    One matmul over the flattened (B * K) axis: no loop over pairs and no (S, T, B, K) intermediate. fp32.
    """
    with fp32_no_autocast(student_logits.device):
        log_p = F.log_softmax(at_least_fp32(student_logits) / student_temp, dim=-1)  # (S, B, K)
        batch = log_p.shape[1]
        return -torch.einsum("sbk,tbk->st", log_p, at_least_fp32(teacher_probs)) / batch  # (S, T)


class DINOLoss(nn.Module):
    """DINO [CLS] loss: mean over view pairs of the batch-mean cross-entropy (see the module docstring)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = SoftmaxCenter(out_dim, center_momentum)

    @property
    def center(self) -> Tensor:
        return self.centering.center

    # ---- teacher targets (no grad)
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(n, K) raw teacher logits -> (n, K) centered, sharpened targets (current center)."""
        return self.centering.softmax_centered(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """(n, K) raw teacher logits -> (n, K) Sinkhorn-Knopp targets over the global batch."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Start the center EMA update with this batch's raw teacher logits (n, K); see `SoftmaxCenter`."""
        self.centering.start_update(teacher_logits)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        self.centering.finish_update()

    def state_snapshot(self) -> Dict[str, Tensor]:
        """Everything this loss carries between steps (the center), copied; see `restore_state`."""
        return {"center": self.centering.snapshot()}

    def restore_state(self, snapshot: Dict[str, Tensor]) -> None:
        self.centering.restore(snapshot["center"])

    # ---- loss
    @staticmethod
    def pair_mask(n_student_crops: int, n_teacher_crops: int, device=None) -> Tensor:
        """(S, T) bool: True for the pairs that enter the loss. Student crops [0, T) are the teacher's views
        in the same order (the global crops), so the diagonal of that block is excluded."""
        mask = torch.ones(n_student_crops, n_teacher_crops, dtype=torch.bool, device=device)
        n_same = min(n_student_crops, n_teacher_crops)
        mask[torch.arange(n_same), torch.arange(n_same)] = False
        return mask

    def forward_pairs(self, student_logits: Tensor, teacher_probs: Tensor) -> Dict[str, Tensor]:
        """Loss and its split into the global-cross and local parts (each divided by the total pair count,
        so `global + local == loss`, like the reference's dino_global/local_crops_loss)."""
        if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(f"DINOLoss expects student (S, B, K) and teacher (T, B, K) with the same B, K; got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
        n_student, n_teacher = student_logits.shape[0], teacher_probs.shape[0]
        ce = cross_entropy_matrix(student_logits, teacher_probs, self.student_temp)  # (S, T)
        mask = self.pair_mask(n_student, n_teacher, device=ce.device)
        n_pairs = n_student * n_teacher - min(n_student, n_teacher)  # counted on the host: no device sync
        if n_pairs == 0:
            raise ValueError(f"DINOLoss: {n_student} student and {n_teacher} teacher crops give no valid pair")
        pair_ce = ce * mask  # (S, T), zero on the excluded same-view pairs
        global_part = pair_ce[:n_teacher].sum() / n_pairs
        local_part = pair_ce[n_teacher:].sum() / n_pairs
        return {"loss": global_part + local_part, "global_crops": global_part, "local_crops": local_part}

    def forward(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """student_logits (S, B, K): the T global crops first (same order as the teacher), then the locals.
        teacher_probs (T, B, K): targets of the teacher's global crops. Returns the scalar loss (fp32)."""
        return self.forward_pairs(student_logits, teacher_probs)["loss"]
