"""Attention weights of one transformer block, computed explicitly, and the CLS token's attention to the patches.

`Attention.forward` runs fused SDPA (or xFormers), which returns no weights; training keeps it. Here a forward
hook on the chosen block's ``attn`` module takes the module's input (the normed tokens) and recomputes
``softmax(q k^T / sqrt(d))`` from the same packed ``qkv`` projection, for that block only. The forward stops after
that block (`get_intermediate_layers` with one index), so later blocks cost nothing.

Token order inside the model: [CLS, registers (R), patches (h * w)]. Registers are left out of the maps; the share
of the CLS attention they take is reported beside them (they soak up attention, Darcet et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


def attention_weights(attn, x: Tensor, queries: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Explicit attention of an `Attention` module on its input x (B, N, D).

    Returns (weights (B, H, Q, N), rows summing to 1; values (B, H, N, d)), Q = N, or the first ``queries`` tokens
    only (1: the CLS row, which saves the N x N matrix on large images). ``weights @ values`` is what SDPA computes
    for those queries before the heads are merged and projected.
    """
    batch, n_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, n_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d), the layout SDPA gets
    if queries is not None:
        q = q[:, :, :queries]
    logits = (q.float() @ k.float().transpose(-2, -1)) * attn.head_dim ** -0.5
    return logits.softmax(dim=-1), v.float()


def block_index(model, block: int) -> int:
    """A block index (negative counts from the end) checked against the model's depth."""
    depth = len(model.blocks)
    index = block + depth if block < 0 else block
    if not 0 <= index < depth:
        raise ValueError(f"block {block} is out of range for a backbone with {depth} blocks")
    return index


@torch.no_grad()
def block_attention(model, images: Tensor, block: int = -1, queries: Optional[int] = None) -> Tensor:
    """Images (B, 3, H, W) -> attention weights (B, heads, Q, T) of block ``block``; T = 1 + R + h * w tokens,
    Q = T or the first ``queries`` (see `attention_weights`)."""
    index = block_index(model, block)
    captured = []

    def hook(module, inputs, output):  # inputs[0]: the normed tokens the block's attention saw
        captured.append(attention_weights(module, inputs[0], queries)[0])

    handle = model.blocks[index].attn.register_forward_hook(hook)
    try:
        model.get_intermediate_layers(images, n=[index])  # stops after block `index`
    finally:
        handle.remove()
    return captured[0]


@dataclass
class ClsAttention:
    """The CLS row of one block's attention, split by token kind.

    patches (B, heads, h, w): attention to each patch (not renormalised: with ``cls`` and ``registers`` it sums to
    1 per head); registers (B, heads, R); cls (B, heads): attention to itself.
    """

    patches: Tensor
    registers: Tensor
    cls: Tensor

    @property
    def mean(self) -> Tensor:
        """(B, h, w): averaged over heads."""
        return self.patches.mean(dim=1)

    def register_share(self) -> Tensor:
        """(B,): share of the CLS attention that went to registers, averaged over heads (0 without registers)."""
        return self.registers.sum(-1).mean(-1)


def cls_attention(model, images: Tensor, block: int = -1) -> ClsAttention:
    """Images (B, 3, H, W), H and W multiples of the patch size -> the CLS attention of ``block``."""
    grid_h, grid_w = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    row = block_attention(model, images, block, queries=1)[:, :, 0]  # (B, heads, T): what CLS looks at
    first_patch = 1 + int(model.num_register_tokens)
    patches = row[:, :, first_patch:].reshape(*row.shape[:2], grid_h, grid_w)
    return ClsAttention(patches=patches, registers=row[:, :, 1:first_patch], cls=row[:, :, 0])


def mass_mask(maps: Tensor, mass: float = 0.6) -> Tensor:
    """Boolean mask (same shape as ``maps`` (..., h, w)) of the smallest set of patches holding ``mass`` of each
    map's total, as in DINO's `visualize_attention.py`. Ties at the cut are broken by position (stable sort)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2).float()  # (..., N)
    share = flat / flat.sum(-1, keepdim=True).clamp_min(1e-12)
    order = share.argsort(dim=-1, descending=True, stable=True)
    cumulative = share.gather(-1, order).cumsum(-1)
    # keep a patch when the mass before it is still short of the target: the smallest prefix reaching it
    keep_sorted = (cumulative - share.gather(-1, order)) < mass - 1e-6
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask.reshape(maps.shape)

