"""Optimiser parameter groups, AdamW construction and per-module gradient clipping (DINOv2 recipe,
Oquab et al. 2023, arXiv 2304.07193; layer-wise lr decay as in BEiT, Bao et al. 2021, arXiv 2106.08254).

Per parameter (the reference's rules, matched on the parameter name inside its sub-module):
  lr_multiplier  = decay ** (L + 1 - layer), layer = 0 for patch_embed / pos_embed / cls_token / mask_token /
                   register_tokens, i + 1 for blocks.{i}, L + 1 (multiplier 1) for the final norm and the heads;
                   times optim.patch_embed_lr_mult (0.2) for patch_embed
  wd_multiplier  = 0 for biases, norm weights (a name containing "norm") and LayerScale gammas, else 1
                   (the tokens and pos_embed keep weight decay, as in the reference)
  is_last_layer  = the head's `last_layer`: its lr is the last-layer lr (0 during the freeze)
Parameters sharing (lr_multiplier, wd_multiplier, is_last_layer) are fused into one group; the engine sets
    group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
    group["weight_decay"] = wd * group["wd_multiplier"]
with `apply_optim_schedule`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

_EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, n_blocks: int) -> int:
    """Depth of a backbone parameter: 0 embeddings, i + 1 for blocks.{i}, n_blocks + 1 for the rest."""
    if any(name.startswith(prefix) or f".{prefix}" in name for prefix in _EMBEDDING_NAMES):
        return 0
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def param_settings(name: str, n_blocks: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                   is_backbone: bool = True) -> Dict[str, Any]:
    """lr_multiplier, wd_multiplier and is_last_layer of one parameter (name inside its sub-module)."""
    if is_backbone:
        lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
    else:
        lr_multiplier = 1.0  # heads: the top of the network
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or name == "bias" or "norm" in name or "gamma" in name
    return {
        "lr_multiplier": lr_multiplier,
        "wd_multiplier": 0.0 if no_decay else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def get_params_groups_with_decay(module: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                                 is_backbone: Optional[bool] = None, prefix: str = "") -> List[Dict[str, Any]]:
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer.

    is_backbone defaults to "the module has `blocks`"; its depth L is len(module.blocks).
    """
    if is_backbone is None:
        is_backbone = hasattr(module, "blocks")
    n_blocks = len(module.blocks) if is_backbone else 0
    groups = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        settings = param_settings(name, n_blocks, layerwise_decay, patch_embed_lr_mult, is_backbone)
        groups.append({"params": param, "name": prefix + name, **settings})
    return groups


def fuse_params_groups(all_params_groups: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Merge per-parameter dicts with equal (lr_multiplier, wd_multiplier, is_last_layer) into optimiser groups
    (first-appearance order, so the group order is deterministic for checkpoint resume)."""
    fused: Dict[tuple, Dict[str, Any]] = {}
    for group in all_params_groups:
        key = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
        if key not in fused:
            fused[key] = {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                          "is_last_layer": key[2]}
        fused[key]["params"].append(group["params"])
        fused[key]["names"].append(group["name"])
    return list(fused.values())


def build_optimizer(param_groups: List[Dict[str, Any]], cfg: Any, device: Optional[torch.device] = None
                    ) -> torch.optim.AdamW:
    """AdamW (betas from optim.adamw_beta1/2) over fused groups; lr and weight decay start at 0 and are set
    each step by `apply_optim_schedule`. Fused kernel on CUDA when compute.fused_optimizer, else foreach."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    betas = (float(cfg.optim.adamw_beta1), float(cfg.optim.adamw_beta2))
    use_fused = bool(cfg.compute.fused_optimizer) and device.type == "cuda"
    groups = [dict(g, lr=0.0, weight_decay=0.0) for g in param_groups]
    if use_fused:
        return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, foreach=True)


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr and weight decay from the schedule values and the group's multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def clip_grad_norms(modules: Mapping[str, nn.Module], max_norm: float) -> Dict[str, torch.Tensor]:
    """Clip the gradient of each sub-module (backbone, dino_head, ibot_head) to global norm `max_norm`
    separately, as the reference does; max_norm <= 0 only measures. Returns the pre-clip norms (0-dim tensors,
    no host sync) keyed by sub-module name."""
    limit = float(max_norm) if max_norm and max_norm > 0 else float("inf")
    norms = {}
    for name, module in modules.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norms[name] = torch.nn.utils.clip_grad_norm_(params, limit)
    return norms
