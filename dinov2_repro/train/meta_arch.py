"""The DINOv2 self-supervised meta-architecture (Oquab et al. 2023, arXiv 2304.07193): a student ViT trained by
gradient descent and a teacher ViT that is its exponential moving average, with three objectives:

  DINO   [CLS] distillation between views       (Caron et al. 2021, arXiv 2104.14294)
  iBOT   masked-patch distillation              (Zhou et al. 2022, arXiv 2111.07832)
  KoLeo  spread of the student's CLS features   (Sablayrolles et al. 2019, arXiv 1806.03198)

One `training_step` (per micro-batch) reads like the algorithm:
  1. teacher (no grad, eval, unmasked global crops) -> CLS and masked-patch tokens -> head -> targets
     (softmax centering with an EMA center, or Sinkhorn-Knopp)
  2. student (masked global crops + local crops in one call, no padding) -> one head call over
     [global CLS, local CLS, masked patch tokens]
  3. total = w_dino * DINO + w_ibot * iBOT + w_koleo * KoLeo
The engine then backpropagates `total_loss`, clips, steps the optimiser and calls `update_teacher(momentum)`.

Gradient accumulation (the engine may call `training_step` k times per optimiser step):
  - every loss is the mean over *that micro-batch*; the engine divides `total_loss` by k before backward;
  - the softmax-centering centers (DINO and iBOT) are updated once per micro-batch with that micro-batch's mean
    (all-reduced over ranks), i.e. k EMA updates per optimiser step; the update is finished before
    `training_step` returns, so the centers are settled whenever a checkpoint is written;
  - Sinkhorn-Knopp and KoLeo see one micro-batch (times the ranks, for SK) at a time;
  - the teacher EMA runs once per optimiser step (`update_teacher`).

Logged values are exactly what is optimised (before the weights): unlike the reference, which logs halved
iBOT and KoLeo values, `ibot_loss` and `koleo_loss` here are the optimised terms, and
`total_loss = w_dino * dino_loss + w_ibot * ibot_loss + w_koleo * koleo_loss`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from ..models.factory import build_backbone_from_config, build_heads_from_config
from ..models.weights import backbone_state, load_strict, pos_embed_img_size, read_weights_file
from .ema import assert_no_shared_storage, ema_update
from .param_groups import fuse_params_groups, get_params_groups_with_decay

N_GLOBAL_CROPS = 2  # DINOv2 always uses two global views

# Batch keys consumed by `training_step` (produced by the SSL collate of dinov2_repro.data).
BATCH_KEYS = ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list",
              "masks_weight")


def select_tokens(patch_tokens: Tensor, flat_indices: Tensor) -> Tensor:
    """patch_tokens (n, N, D), flat_indices (M,) into n * N (the collate's mask_indices_list) -> (M, D).

    Same as patch_tokens.flatten(0, 1)[flat_indices] without copying the (n * N, D) tensor (the patch tokens
    are a strided view of the normed sequence) and without the host sync of boolean-mask indexing.
    """
    n_patches = patch_tokens.shape[1]
    return patch_tokens[flat_indices // n_patches, flat_indices % n_patches]


class SSLMetaArch(nn.Module):
    """Student / EMA teacher with DINO, iBOT and KoLeo losses; `.student` and `.teacher` are ModuleDicts with
    keys `backbone`, `dino_head` and, when iBOT has its own head, `ibot_head`."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.dino_loss_weight = float(cfg.dino.loss_weight)
        self.ibot_loss_weight = float(cfg.ibot.loss_weight)
        self.koleo_loss_weight = float(cfg.koleo.loss_weight)
        self.do_ibot = self.ibot_loss_weight > 0
        self.do_koleo = self.koleo_loss_weight > 0
        self.centering = str(cfg.train.centering)
        if self.centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"train.centering={self.centering!r} is not one of ('softmax', 'sinkhorn_knopp')")

        img_size = int(cfg.crops.global_crops_size)
        pretrained, source = None, f"student.pretrained_weights={cfg.student.pretrained_weights}"
        if cfg.student.pretrained_weights:
            pretrained = backbone_state(read_weights_file(cfg.student.pretrained_weights), source)
            # built at the checkpoint's resolution; pos_embed is interpolated to the crops at run time
            img_size = pos_embed_img_size(pretrained, source)
        student_backbone = build_backbone_from_config(cfg.student, img_size)
        teacher_backbone = build_backbone_from_config(cfg.student, img_size, teacher=True)  # no drop path
        if pretrained is not None:
            load_strict(student_backbone, pretrained, source)
        heads = build_heads_from_config(cfg, student_backbone.embed_dim)
        self.student = nn.ModuleDict({"backbone": student_backbone, **heads})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **{k: copy.deepcopy(v) for k, v in heads.items()}})
        # The teacher starts as an exact copy of the student and is never trained by gradient.
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        assert_no_shared_storage(self.student, self.teacher)
        self.ibot_separate_head = "ibot_head" in self.student

        student_temp, center_momentum = float(cfg.dino.student_temp), float(cfg.dino.center_momentum)
        ibot_prototypes = int(cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes)
        self.dino_loss = DINOLoss(int(cfg.dino.head_n_prototypes), student_temp, center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes, student_temp, center_momentum)
        self.koleo_loss = KoLeoLoss()

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "SSLMetaArch":
        """Switch the student (and loss modules) to train/eval; the teacher stays in eval mode, except the
        BatchNorm layers of its heads (``head_use_bn``), which use batch statistics while training, as DINO v1's
        teacher does: the EMA moves parameters, not running statistics, so in eval mode they would stay at their
        initial values (mean 0, variance 1) and the layer would do nothing."""
        super().train(mode)
        self.teacher.eval()
        if mode:
            for name, module in self.teacher.named_children():
                if name != "backbone":
                    for layer in module.modules():
                        if isinstance(layer, (nn.BatchNorm1d, nn.SyncBatchNorm)):
                            layer.train()
        return self

    def forward(self, batch: Mapping[str, Any], teacher_temp: float) -> Dict[str, Tensor]:
        """Same as `training_step` (so that wrappers calling the module work)."""
        return self.training_step(batch, teacher_temp)

    # ------------------------------------------------------------------ one step
    def _teacher_targets(self, teacher_logits: Tensor, teacher_temp: float, loss: nn.Module) -> Tensor:
        """(n, K) raw teacher logits -> (n, K) targets; softmax centering also starts its center update."""
        if self.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp_teacher(teacher_logits, teacher_temp)
        targets = loss.softmax_center_teacher(teacher_logits, teacher_temp)  # uses the center before this batch
        loss.update_center(teacher_logits)  # async all-reduce, finished at the end of the step
        return targets

    @torch.no_grad()
    def teacher_step(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> Dict[str, Tensor]:
        """Teacher targets for the unmasked global crops: CLS (2B, K) and masked patches (M, K)."""
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_tokens = out["x_norm_clstoken"]  # (2B, D)
        n_cls = cls_tokens.shape[0]
        if self.do_ibot:
            masked_tokens = select_tokens(out["x_norm_patchtokens"], mask_indices)  # (M, D)
            if self.ibot_separate_head:
                cls_logits = self.teacher["dino_head"](cls_tokens)  # (2B, K)
                patch_logits = self.teacher["ibot_head"](masked_tokens)  # (M, K_ibot)
            else:  # tied: one head call over CLS and masked patch tokens
                logits = self.teacher["dino_head"](torch.cat([cls_tokens, masked_tokens]))  # (2B + M, K)
                cls_logits, patch_logits = logits[:n_cls], logits[n_cls:]
        else:
            cls_logits = self.teacher["dino_head"](cls_tokens)
            patch_logits = None
        targets = {"cls_logits": cls_logits,
                   "cls_probs": self._teacher_targets(cls_logits, teacher_temp, self.dino_loss)}  # (2B, K)
        if patch_logits is not None:
            targets["patch_probs"] = self._teacher_targets(patch_logits, teacher_temp, self.ibot_patch_loss)
        return targets

    def student_step(self, global_crops: Tensor, local_crops: Tensor, masks: Optional[Tensor],
                     mask_indices: Tensor) -> Dict[str, Tensor]:
        """Student head outputs: cls_logits (n_crops, B, K) globals first, patch_logits (M, K), and the
        global CLS tokens before the head (2B, D) for KoLeo."""
        n_images = global_crops.shape[0]
        batch = n_images // N_GLOBAL_CROPS
        backbone = self.student["backbone"]
        if local_crops.shape[0] > 0:  # one call, each crop size a dense batch
            global_out, local_out = backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
            local_cls = local_out["x_norm_clstoken"]  # (n_local * B, D)
        else:
            global_out = backbone(global_crops, masks=masks, is_training=True)
            local_cls = global_out["x_norm_clstoken"].new_zeros(0, global_out["x_norm_clstoken"].shape[-1])
        global_cls = global_out["x_norm_clstoken"]  # (2B, D)

        head_inputs = [global_cls, local_cls]
        masked_tokens = None
        if self.do_ibot:
            masked_tokens = select_tokens(global_out["x_norm_patchtokens"], mask_indices)  # (M, D)
            if not self.ibot_separate_head:
                head_inputs.append(masked_tokens)
        logits = self.student["dino_head"](torch.cat(head_inputs))  # (2B + n_local * B [+ M], K)
        n_cls = global_cls.shape[0] + local_cls.shape[0]
        result = {"cls_logits": logits[:n_cls].view(-1, batch, logits.shape[-1]), "global_cls": global_cls}
        if self.do_ibot:
            result["patch_logits"] = (self.student["ibot_head"](masked_tokens) if self.ibot_separate_head
                                      else logits[n_cls:])  # (M, K)
        return result

    def training_step(self, batch: Mapping[str, Any], teacher_temp: float) -> Dict[str, Tensor]:
        """One micro-batch: returns the loss terms as optimised, `total_loss` (call backward on it) and detached
        diagnostics, all as tensors (no host sync; `.item()` them at log time). Keys: see `LOSS_KEYS` and
        `DIAGNOSTIC_KEYS`."""
        device = self.dino_loss.center.device
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)  # (2B, 3, G, G)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)  # (n_local * B, 3, L, L)
        n_images = global_crops.shape[0]
        if n_images == 0 or n_images % N_GLOBAL_CROPS:
            raise ValueError(f"collated_global_crops has {n_images} images; expected {N_GLOBAL_CROPS} x batch size")
        batch_size = n_images // N_GLOBAL_CROPS
        if local_crops.shape[0] % batch_size:
            raise ValueError(f"collated_local_crops has {local_crops.shape[0]} images, not a multiple of the "
                             f"batch size {batch_size}")
        if self.do_ibot:
            masks = batch["collated_masks"].to(device, non_blocking=True).bool()  # (2B, N)
            mask_indices = batch["mask_indices_list"].to(device, non_blocking=True).long()  # (M,)
            masks_weight = batch["masks_weight"].to(device, non_blocking=True)  # (M,)
        else:  # without iBOT the student sees unmasked crops, as in DINO v1
            masks = None
            mask_indices = torch.zeros(0, dtype=torch.long, device=device)
            masks_weight = None

        # 1. teacher targets (no grad)
        teacher = self.teacher_step(global_crops, mask_indices, teacher_temp)
        teacher_cls_probs = teacher["cls_probs"].view(N_GLOBAL_CROPS, batch_size, -1)  # (2, B, K)

        # 2. student
        student = self.student_step(global_crops, local_crops, masks, mask_indices)

        # 3. losses
        dino = self.dino_loss.forward_pairs(student["cls_logits"], teacher_cls_probs)
        loss_dict: Dict[str, Tensor] = {"dino_loss": dino["loss"], "dino_global_crops_loss": dino["global_crops"],
                                        "dino_local_crops_loss": dino["local_crops"]}
        total = self.dino_loss_weight * dino["loss"]
        if self.do_ibot:
            ibot = self.ibot_patch_loss(student["patch_logits"], teacher["patch_probs"], masks_weight, n_images)
            loss_dict["ibot_loss"] = ibot
            total = total + self.ibot_loss_weight * ibot
        if self.do_koleo:
            # Per global view: the two views of one image are not pushed apart.
            koleo = sum(self.koleo_loss(view) for view in student["global_cls"].chunk(N_GLOBAL_CROPS))
            loss_dict["koleo_loss"] = koleo
            total = total + self.koleo_loss_weight * koleo

        # Settle the center updates started in step 1 (their all-reduce overlapped the student forward).
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()

        zero = total.new_zeros(())
        out = {key: loss_dict.get(key, zero).detach() for key in LOSS_KEYS}
        out["total_loss"] = total
        out.update(self._diagnostics(teacher["cls_probs"], student["global_cls"], masks))
        return out

    @torch.no_grad()
    def _diagnostics(self, teacher_cls_probs: Tensor, student_global_cls: Tensor,
                     masks: Optional[Tensor]) -> Dict[str, Tensor]:
        """Collapse monitors (this rank's micro-batch): teacher entropy, KL(mean teacher || uniform), the
        DINO center norm, std of the L2-normalised student CLS over the batch, fraction of masked patches."""
        probs = teacher_cls_probs.float()  # (2B, K)
        n_prototypes = probs.shape[-1]
        entropy = -torch.special.xlogy(probs, probs).sum(-1).mean()
        mean_probs = probs.mean(0)  # (K,)
        kl_to_uniform = torch.special.xlogy(mean_probs, mean_probs).sum() + math.log(n_prototypes)
        features = F.normalize(student_global_cls.detach().float(), dim=-1)  # (2B, D)
        cls_std = features.std(dim=0).mean() if features.shape[0] > 1 else features.new_zeros(())
        mask_fraction = masks.float().mean() if masks is not None else probs.new_zeros(())
        return {
            "teacher_entropy": entropy,
            "teacher_kl_to_uniform": kl_to_uniform,
            "center_norm": self.dino_loss.center.norm(),
            "student_cls_std": cls_std,
            "mask_fraction": mask_fraction,
        }

    # ------------------------------------------------------------------ after the optimiser step
    @torch.no_grad()
    def loss_state(self) -> Dict[str, Dict[str, Tensor]]:
        """A copy of the state the losses carry between steps (the DINO and iBOT centers)."""
        return {"dino": self.dino_loss.state_snapshot(), "ibot": self.ibot_patch_loss.state_snapshot()}

    def restore_loss_state(self, snapshot: Mapping[str, Dict[str, Tensor]]) -> None:
        """Undo the loss-state updates since `loss_state` (an update dropped for a NaN must not move them)."""
        self.dino_loss.restore_state(snapshot["dino"])
        self.ibot_patch_loss.restore_state(snapshot["ibot"])

    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (backbone and heads)."""
        ema_update(self.student, self.teacher, momentum)

    def get_params_groups(self) -> List[Dict[str, Any]]:
        """Fused optimiser groups over the student's sub-modules (layer-wise lr decay and patch-embed lr
        multiplier in the backbone, no weight decay on biases/norms/gammas, last-layer flag)."""
        decay = float(self.cfg.optim.layerwise_decay)
        patch_embed_mult = float(self.cfg.optim.patch_embed_lr_mult)
        groups = []
        for name, module in self.student.items():
            groups += get_params_groups_with_decay(module, decay, patch_embed_mult, is_backbone=(name == "backbone"),
                                                   prefix=f"student.{name}.")
        return fuse_params_groups(groups)


LOSS_KEYS = ("dino_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
DIAGNOSTIC_KEYS = ("teacher_entropy", "teacher_kl_to_uniform", "center_norm", "student_cls_std", "mask_fraction")
