"""One optimiser step, in the order of DINO v1's ``main_dino.py``: schedules -> teacher and student forward with
the losses -> backward -> unscale -> clip -> finite check -> optimiser step -> teacher EMA.

Gradient accumulation: the step takes k micro-batches; each loss is its micro-batch's mean divided by k before
backward, so the gradient is the mean over all k x world x batch images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from .guards import NonFiniteLossError, first_nonfinite
from .param_groups import apply_optim_schedule, clip_grad_norms

STOP_KEY = "stop_requested"
SAVE_KEY = "save_requested"


@dataclasses.dataclass
class StepContext:
    """What every step needs besides the iteration and the batches."""
    meta_arch: Any
    optimizer: Any
    scaler: Any  # torch.amp.GradScaler, disabled unless fp16
    schedules: Any  # `schedules.Schedules`
    parallel: Any  # `distributed.parallelize.Parallelism`
    autocast: Callable[[], Any]
    clip_grad: float
    nonfinite: str = "stop"  # "stop" | "skip_batch"
    stop_requested: Callable[[], bool] = lambda: False  # this rank got SIGINT/SIGTERM; agreed on in the sync
    save_due: Callable[[], bool] = lambda: False  # this rank's checkpoint timer ran out; agreed on in the sync


def train_one_iteration(it: int, micro_batches: List[dict], ctx: StepContext) -> Dict[str, Any]:
    """One optimiser step over ``micro_batches``; returns the (all-rank mean) loss terms, diagnostics, grad
    norms, the schedule values, ``stop_requested`` / ``save_requested`` (> 0 when any rank asked) and ``status``
    ("ok" | "skipped" | "fp16_overflow").

    Raises `NonFiniteLossError` (weights untouched) on a NaN/inf loss or gradient when ``nonfinite == "stop"``.
    """
    meta_arch, optimizer, scaler = ctx.meta_arch, ctx.optimizer, ctx.scaler
    # Every hyper-parameter is a function of the iteration, so a resumed run gets the same values.
    sched = ctx.schedules.at(it)
    apply_optim_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])  # x lr_mult; frozen last layer
    optimizer.zero_grad(set_to_none=True)
    loss_state = meta_arch.loss_state()  # a dropped update must not move the centers either
    terms = _forward_backward(micro_batches, ctx, sched["teacher_temp"])
    device = terms[0]["total_loss"].device  # per-rank requests ride on the step's one all-reduce: ranks agree
    terms[0][STOP_KEY] = torch.tensor(float(ctx.stop_requested()), device=device)
    terms[0][SAVE_KEY] = torch.tensor(float(ctx.save_due()), device=device)
    scaler.unscale_(optimizer)  # true gradients for clipping and the finite check (no-op without fp16)
    grad_norms = clip_grad_norms(dict(meta_arch.student.items()), ctx.clip_grad)  # per sub-module, as the reference
    values = global_means(terms, grad_norms)  # one all-reduce and one host sync per iteration
    values.update(sched)
    bad = first_nonfinite(loss_terms_first(values))
    bad_grad = first_nonfinite({key: v for key, v in values.items() if key.startswith("grad_norm")})
    overflow = bad is None and bad_grad is not None and scaler.is_enabled()  # fp16: lower the scale, retry
    bad = bad or (None if overflow else bad_grad)
    if bad is not None and ctx.nonfinite == "stop":
        raise NonFiniteLossError(bad, it, values[bad])
    if bad is not None or overflow:  # drop this update on every rank alike: no step, no EMA, centers restored
        optimizer.zero_grad(set_to_none=True)
        meta_arch.restore_loss_state(loss_state)
        if scaler.is_enabled():  # same back-off on all ranks, whatever each rank's shard of the grads held
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return dict(values, status="fp16_overflow" if overflow else "skipped", nonfinite_term=bad)
    scaler.step(optimizer)
    scaler.update()
    meta_arch.update_teacher(sched["momentum"])  # EMA teacher follows the updated student
    return dict(values, status="ok")


def _forward_backward(micro_batches: List[dict], ctx: StepContext, teacher_temp: float) -> List[Dict[str, Any]]:
    """Forward (teacher, student, losses) and backward of each micro-batch; returns the detached outputs."""
    k, terms = len(micro_batches), []
    for i, batch in enumerate(micro_batches):
        with ctx.autocast():
            out = ctx.meta_arch.training_step(batch, teacher_temp=teacher_temp)
        ctx.parallel.after_forward(ctx.meta_arch)  # FSDP: re-shard the teacher's gathered parameters
        ctx.parallel.before_backward(ctx.meta_arch, last_micro_batch=(i == k - 1))  # reduce grads on the last only
        ctx.scaler.scale(out["total_loss"] / k).backward()  # mean over micro-batches; fp16: scaled against underflow
        ctx.parallel.after_backward(ctx.meta_arch, last_micro_batch=(i == k - 1))  # DDP: average grads over ranks
        terms.append({key: value.detach().float() for key, value in out.items()})
    return terms


def loss_terms_first(values: Dict[str, float]) -> Dict[str, float]:
    """Loss terms in the order a NaN should be reported: each objective, its parts, then their sum."""
    order = ["dino_loss", "ibot_loss", "koleo_loss"]
    order += sorted(k for k in values if k.endswith("loss") and k not in order and k != "total_loss")
    order += ["total_loss"]
    return {key: values[key] for key in order if key in values}


def global_means(terms: List[Dict[str, Any]], grad_norms: Dict[str, Any]) -> Dict[str, float]:
    """Mean over micro-batches and ranks of every scalar the step produced, plus the (global) grad norms."""
    keys = sorted(set().union(*terms))
    zero = terms[0]["total_loss"].new_zeros(())
    local = torch.stack([torch.stack([t.get(key, zero).reshape(()) for key in keys]) for t in terms])
    local = local.sum(0) / len(terms)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local)
        local /= dist.get_world_size()
    norm_keys = sorted(grad_norms)
    norms = [_full(grad_norms[key]).float().reshape(()).to(local.device) for key in norm_keys]
    flat = torch.cat([local, torch.stack(norms)]) if norms else local
    numbers = flat.tolist()
    values = dict(zip(keys, numbers[:len(keys)]))
    values.update({f"grad_norm_{key}": v for key, v in zip(norm_keys, numbers[len(keys):])})
    return values


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
