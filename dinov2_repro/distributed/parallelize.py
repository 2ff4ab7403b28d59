"""Data-parallel policy for the SSL meta-architecture: the only module that knows about DDP and FSDP.

``compute.parallelism``:

* ``none`` - one process; nothing to do.
* ``ddp`` - every rank holds full replicas of student, teacher and heads. Parameters and buffers are broadcast
  from rank 0 once, and after the backward pass of the last micro-batch the student's gradients are averaged
  over ranks with a few bucketed all-reduces (`average_gradients`). That is what ``DistributedDataParallel``
  computes; we do it explicitly instead of wrapping modules because the meta-architecture calls its student
  sub-modules several times per step (one multi-crop backbone call, the head on CLS and on masked patch
  tokens) and relies on their plain names: a DDP wrapper would rename every parameter (``module.``), which
  breaks the name-matched teacher EMA, the layer-wise lr decay and checkpoint keys. Unlike DDP, the
  reduction does not overlap the backward pass; large multi-GPU runs should use FSDP (as the DINOv2 reference
  does), which overlaps and also shards memory.
* ``fsdp`` - FSDP2 (``fully_shard``): each transformer block is its own unit (its parameters are gathered just
  before the block runs and freed after it), then the rest of the backbone (embeddings, final norm), then each
  head. Student and teacher are sharded *identically* (same units, same mesh, same dim-0 sharding), so the
  EMA update works shard by shard on the local tensors of the DTensors, with no communication.
  Mixed precision: ``MixedPrecisionPolicy(param_dtype=compute.param_dtype, reduce_dtype=fp32)`` when
  ``compute.precision`` is bf16/fp16 (parameters are gathered in low precision, gradients are reduced and
  stored in fp32 on the fp32 master shards); fp32 training, or ``compute.param_dtype: fp32``, uses no policy.
  The teacher runs forward only, so its gathered parameters are freed explicitly after its forward
  (`reshard_teacher`); with gradient accumulation the reduce-scatter runs on the last micro-batch only.
  Checkpoints go through ``torch.distributed.checkpoint`` (see ``train/checkpoint.py``).

The import of ``fully_shard`` uses the public location: ``torch.distributed.fsdp`` (torch >= 2.6), with
``torch.distributed._composable.fsdp`` for torch 2.4/2.5, where that is the documented path.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List

import torch
from torch import nn

BUCKET_BYTES = 25 * 2**20  # like DDP's default bucket_cap_mb: few collectives, bounded extra memory

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_api():
    """(fully_shard, MixedPrecisionPolicy, FSDPModule) for this torch version."""
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy, FSDPModule


# ------------------------------------------------------------------------------------------------------- DDP
@torch.no_grad()
def broadcast_from_rank0(modules: Iterable[nn.Module]) -> None:
    """Make every rank start from rank 0's parameters and buffers (replicas must be identical)."""
    import torch.distributed as dist

    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def _buckets(tensors: List[torch.Tensor]) -> Iterator[List[torch.Tensor]]:
    bucket, size = [], 0
    for tensor in tensors:
        if bucket and (size + tensor.numel() * tensor.element_size() > BUCKET_BYTES
                       or tensor.dtype != bucket[0].dtype or tensor.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(modules: Iterable[nn.Module]) -> None:
    """Replace each trainable parameter's gradient by its mean over ranks (DDP semantics).

    A parameter without a gradient on this rank (unused in this step) contributes zeros, so every rank issues
    the same sequence of collectives whatever its local graph was.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


# ------------------------------------------------------------------------------------------------------- FSDP
def fsdp_mixed_precision(precision: str, param_dtype: str):
    """The FSDP2 mixed-precision policy: low-precision parameters for compute, fp32 gradient reduction."""
    _, MixedPrecisionPolicy, _ = fsdp_api()
    if precision == "fp32" or param_dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=torch.float32)


def _shard_network(network: nn.Module, mp_policy, mesh=None) -> None:
    """Shard one student-or-teacher ModuleDict: blocks, then the backbone, then each head.

    FSDP gathers a unit's parameters in its ``__call__`` hooks, so the meta-architecture must call the backbone
    and heads as modules (``backbone(x, is_training=True)``), not through other methods.
    """
    fully_shard, _, _ = fsdp_api()
    for module in network.values():
        for block in getattr(module, "blocks", ()):
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
        fully_shard(module, mesh=mesh, mp_policy=mp_policy)


def fully_shard_meta_arch(meta_arch: nn.Module, precision: str, param_dtype: str, mesh=None) -> nn.Module:
    """Apply the FSDP2 policy (module docstring) to ``meta_arch.student`` and ``meta_arch.teacher`` in place."""
    mp_policy = fsdp_mixed_precision(precision, param_dtype)
    _shard_network(meta_arch.student, mp_policy, mesh)
    _shard_network(meta_arch.teacher, mp_policy, mesh)
    return meta_arch


def fsdp_modules(module: nn.Module) -> List[nn.Module]:
    _, _, FSDPModule = fsdp_api()
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_teacher(meta_arch: nn.Module) -> None:
    """Free the teacher's gathered parameters after its (no-grad) forward.

    FSDP2 keeps a root module's parameters unsharded after forward, expecting a backward that never comes for
    the teacher; the EMA update must see the sharded parameters, exactly like the student's.
    """
    for module in fsdp_modules(meta_arch.teacher):
        module.reshard()


def set_gradient_sync(meta_arch: nn.Module, enabled: bool) -> None:
    """FSDP: skip the gradient reduce-scatter on micro-batches that are not the last of an accumulation."""
    for module in fsdp_modules(meta_arch.student):
        module.set_requires_gradient_sync(enabled)


# ------------------------------------------------------------------------------------------------------- entry
class Parallelism:
    """The engine's handle on the data-parallel policy: ``prepare`` once, then the per-step hooks.

    ``kind`` is ``compute.parallelism``. The hooks are no-ops where they do not apply, so the training loop
    has one code path for every mode.
    """

    def __init__(self, kind: str, precision: str = "fp32", param_dtype: str = "fp32"):
        if kind not in ("none", "ddp", "fsdp"):
            raise ValueError(f"compute.parallelism = {kind!r} is not one of ['none', 'ddp', 'fsdp']")
        self.kind, self.precision, self.param_dtype = kind, precision, param_dtype

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    def prepare(self, meta_arch: nn.Module, mesh=None) -> nn.Module:
        """Wrap/shard/broadcast ``meta_arch`` in place; call it after moving the model to its device and
        before building the optimiser (FSDP replaces the parameters by sharded ones)."""
        if self.kind == "fsdp":
            fully_shard_meta_arch(meta_arch, self.precision, self.param_dtype, mesh)
        elif self.kind == "ddp":
            broadcast_from_rank0([meta_arch])
        return meta_arch

    def before_backward(self, meta_arch: nn.Module, last_micro_batch: bool) -> None:
        if self.kind == "fsdp":
            set_gradient_sync(meta_arch, last_micro_batch)

    def after_forward(self, meta_arch: nn.Module) -> None:
        if self.kind == "fsdp":
            reshard_teacher(meta_arch)

    def after_backward(self, meta_arch: nn.Module, last_micro_batch: bool) -> None:
        if self.kind == "ddp" and last_micro_batch:
            average_gradients([meta_arch.student])
