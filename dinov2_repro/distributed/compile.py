"""Compile and activation-checkpointing policy for the ViT backbones (applied by the engine, never by models).

Both act *per transformer block* and replace only the block instance's ``forward``: module names, parameter
names and state-dict keys stay those of the plain model (no ``_orig_mod.`` / ``_checkpoint_wrapped_module.``
prefixes), so checkpoints, the EMA pairing of student and teacher, and hub exports are unaffected.

* Activation checkpointing (``compute.activation_checkpointing``): student blocks only (the teacher runs without
  gradients, there is nothing to save). Non-reentrant ``torch.utils.checkpoint``: works with inputs that do not
  require grad, with lists of tensors (the multi-crop forward) and with FSDP2's hooks, and it restores the RNG
  state on recomputation so drop-path masks are identical in both passes.
* ``torch.compile`` (``compute.compile``): each block separately (student and teacher). One block is small,
  compiles quickly, and the compiled code is reused by every block of the same shapes; whole-model compilation
  would also trace the data-dependent masking and the loss code. With checkpointing on, the compiled function
  is the checkpointed block (torch.compile turns a non-reentrant checkpoint into one region it can optimise),
  the order torchtitan uses; FSDP's hooks stay outside the compiled code.

Order: `apply_activation_checkpointing`, then `compile_blocks`, then `parallelize.fully_shard_meta_arch`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn


def _blocks(backbone: nn.Module):
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(backbone).__name__} has no .blocks: per-block policies need a flat block list")
    return list(blocks)


def apply_activation_checkpointing(backbone: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them; returns #blocks."""
    from torch.utils.checkpoint import checkpoint

    def checkpointed(forward: Callable[..., Any], *args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    blocks = _blocks(backbone)
    for block in blocks:
        block.forward = functools.partial(checkpointed, block.forward)
    return len(blocks)


def compile_blocks(backbone: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every block's forward (keyword arguments go to ``torch.compile``); returns #blocks."""
    import torch

    blocks = _blocks(backbone)
    for block in blocks:
        block.forward = torch.compile(block.forward, **compile_kwargs)
    return len(blocks)


def apply_compute_policies(meta_arch: nn.Module, compile: bool, activation_checkpointing: bool) -> None:
    """Apply the config's ``compute.compile`` / ``compute.activation_checkpointing`` to student and teacher."""
    if activation_checkpointing:
        apply_activation_checkpointing(meta_arch.student["backbone"])
    if compile:
        compile_blocks(meta_arch.student["backbone"])
        compile_blocks(meta_arch.teacher["backbone"])
