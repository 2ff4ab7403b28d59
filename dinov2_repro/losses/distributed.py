"""All-reduce helpers that are no-ops in a single process.

The teacher targets (softmax-centering center, Sinkhorn-Knopp marginals) need sums over the *global* batch.
These wrappers let the same loss code run in one process (tests, CPU demo) and under torchrun.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group exists (collectives must then be called on every rank)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_(tensor: Tensor, op: str = "sum", async_op: bool = False) -> Optional[object]:
    """In-place all-reduce of `tensor` ("sum" or "max"); returns the async work handle (or None).

    Without a process group the tensor already holds the global value and nothing happens.
    """
    if not is_distributed():
        return None
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce_ op={op!r} is not one of {tuple(ops)}")
    return dist.all_reduce(tensor, op=ops[op], async_op=async_op)


def wait(handle: Optional[object]) -> None:
    """Wait for a handle returned by `all_reduce_(..., async_op=True)` (None: nothing to wait for)."""
    if handle is not None:
        handle.wait()


def fp32_no_autocast(device: torch.device):
    """Context in which autocast is off, so loss arithmetic really runs in the fp32 of its inputs."""
    return torch.autocast(device_type=device.type, enabled=False)


def at_least_fp32(tensor: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (tests may run the losses in fp64)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
