"""Teacher as an exponential moving average of the student (mean teacher: Tarvainen & Valpola 2017;
DINO, Caron et al. 2021, arXiv 2104.14294):  teacher <- m * teacher + (1 - m) * student,  after each step.

Parameters are matched by name, so the update fails loudly if the two networks ever differ in structure.
Under FSDP2 both networks are sharded the same way and the update runs on the local shards.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn


def _local(tensor: Tensor) -> Tensor:
    # DTensor (FSDP2) -> this rank's shard; plain tensors unchanged. No FSDP import needed.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def matched_parameters(student: nn.Module, teacher: nn.Module) -> Tuple[List[Tensor], List[Tensor]]:
    """The student's and teacher's parameters in the same (name) order; raises if the names differ."""
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        only_s = sorted(student_params.keys() - teacher_params.keys())
        only_t = sorted(teacher_params.keys() - student_params.keys())
        raise ValueError(f"student and teacher parameters differ: only in student {only_s[:5]}, "
                         f"only in teacher {only_t[:5]}")
    names = list(student_params)
    return [student_params[n] for n in names], [teacher_params[n] for n in names]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, one foreach kernel over all parameters.

    momentum 1 leaves the teacher unchanged; momentum 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    student_params, teacher_params = matched_parameters(student, teacher)
    teacher_local = [_local(p.detach()) for p in teacher_params]
    student_local = [_local(p.detach()).to(dtype=t.dtype) for p, t in zip(student_params, teacher_local)]
    # lerp(t, s, w) = t + w (s - t): exact at w = 0 (teacher kept) and w = 1 (student copied).
    torch._foreach_lerp_(teacher_local, student_local, 1.0 - momentum)


def assert_no_shared_storage(student: nn.Module, teacher: nn.Module) -> None:
    """Raise AssertionError if any teacher tensor (parameter or buffer) shares memory with the student:
    an EMA teacher that aliases the student would silently be the student."""

    def storages(module: nn.Module):
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        return {_local(t).untyped_storage().data_ptr(): name for name, t in tensors if _local(t).numel() > 0}

    student_storage = storages(student)
    shared = [(name, student_storage[ptr]) for ptr, name in storages(teacher).items() if ptr in student_storage]
    assert not shared, f"teacher and student share storage (teacher name, student name): {shared[:5]}"
