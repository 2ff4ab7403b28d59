"""Hyper-parameter schedules of the DINOv2 recipe (Oquab et al. 2023, arXiv 2304.07193; DINO v1, arXiv 2104.14294).

Every value is a pure function of the global iteration, so a resumed run gets exactly the same numbers. The
shapes follow the reference's CosineScheduler (array-free here):

    [freeze: 0] -> [warmup: linspace(start, base, warmup_iters)] -> cosine from base to final -> final

  lr:            warmup from 0 over optim.warmup_epochs, cosine to optim.min_lr; peak = base_lr scaled by the
                 global batch (sqrt(batch / 1024), linear batch / 256, or none)
  last-layer lr: the lr, but 0 for the first optim.freeze_last_layer_epochs (AdamW's decoupled weight decay is
                 p *= 1 - lr * wd, so lr 0 also stops weight decay: the frozen layer does not move at all)
  weight decay:  cosine 0.04 -> 0.4
  momentum:      cosine 0.992 -> 1.0 (teacher EMA)
  teacher temp:  linear 0.04 -> 0.07 over teacher.warmup_teacher_temp_epochs, then constant

One "epoch" is train.official_epoch_length iterations, independent of the dataset size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict


def warmup_cosine(iteration: int, base_value: float, final_value: float, total_iters: int,
                  warmup_iters: int = 0, start_warmup_value: float = 0.0, freeze_iters: int = 0) -> float:
    """Value at `iteration` of: freeze_iters zeros, then warmup_iters points of linspace(start, base)
    (the last one equal to base), then a half cosine from base towards final; final from total_iters on.

    If freeze + warmup exceed total_iters (a run shorter than its warmup), the warmup is shortened to fit, so
    the peak is still reached (at the last iteration) instead of being cut off mid-ramp.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if iteration >= total_iters:
        return float(final_value)
    freeze_iters = min(max(freeze_iters, 0), total_iters)
    warmup_iters = min(max(warmup_iters, 0), total_iters - freeze_iters)
    if iteration < freeze_iters:
        return 0.0
    step = iteration - freeze_iters
    if step < warmup_iters:
        if warmup_iters == 1:
            return float(start_warmup_value)  # np.linspace(start, base, 1) == [start]
        return start_warmup_value + (base_value - start_warmup_value) * step / (warmup_iters - 1)
    step -= warmup_iters
    n_cosine = total_iters - freeze_iters - warmup_iters
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * step / n_cosine))


def scaled_lr(base_lr: float, global_batch: int, scaling_rule: str) -> float:
    """Peak learning rate for `global_batch` samples per optimiser step."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * global_batch / 256.0
    if scaling_rule == "none":
        return base_lr
    raise ValueError(f"optim.scaling_rule={scaling_rule!r} is not one of ('sqrt_wrt_1024', 'linear_wrt_256', 'none')")


def _in_iterations(length: float) -> int:
    """A schedule length in iterations, rounded half up (epochs x a possibly fractional epoch)."""
    return int(math.floor(length + 0.5))


@dataclass(frozen=True)
class Schedules:
    """All per-iteration hyper-parameters; `at(iteration)` gives them as a dict."""

    total_iterations: int  # the schedules' length: the cosines end here
    peak_lr: float
    min_lr: float
    lr_warmup_iterations: int
    freeze_last_layer_iterations: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    final_momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    teacher_temp_warmup_iterations: int
    stop_iteration: int = 0  # where the run stops: total_iterations, or earlier with train.max_iterations

    @classmethod
    def from_config(cls, cfg: Any, global_batch: int) -> "Schedules":
        """global_batch: samples per optimiser step (batch_size_per_gpu x world size x grad_accum_steps).

        The schedules span ``optim.epochs`` epochs of ``train.official_epoch_length`` iterations, or, with
        ``train.iterations = N``, N iterations with every epoch-based length scaled to fit (an epoch is then
        N / optim.epochs iterations). ``train.max_iterations`` stops the run earlier without changing any schedule.
        """
        epochs = int(cfg.optim.epochs)
        if int(cfg.train.iterations) > 0:
            total, epoch = int(cfg.train.iterations), int(cfg.train.iterations) / max(epochs, 1)
        else:
            epoch = int(cfg.train.official_epoch_length)
            total = epochs * epoch
        stop = int(cfg.train.max_iterations) or total
        if not 1 <= stop <= total:
            raise ValueError(f"the run must stop within its schedule: train.max_iterations={cfg.train.max_iterations}"
                             f", schedule {total} iterations (optim.epochs={epochs}, train.iterations="
                             f"{cfg.train.iterations}, train.official_epoch_length={cfg.train.official_epoch_length})")
        return cls(
            total_iterations=total,
            peak_lr=scaled_lr(float(cfg.optim.base_lr), global_batch, str(cfg.optim.scaling_rule)),
            min_lr=float(cfg.optim.min_lr),
            lr_warmup_iterations=_in_iterations(float(cfg.optim.warmup_epochs) * epoch),
            freeze_last_layer_iterations=_in_iterations(float(cfg.optim.freeze_last_layer_epochs) * epoch),
            weight_decay=float(cfg.optim.weight_decay),
            weight_decay_end=float(cfg.optim.weight_decay_end),
            momentum_teacher=float(cfg.teacher.momentum_teacher),
            final_momentum_teacher=float(cfg.teacher.final_momentum_teacher),
            warmup_teacher_temp=float(cfg.teacher.warmup_teacher_temp),
            teacher_temp=float(cfg.teacher.teacher_temp),
            teacher_temp_warmup_iterations=_in_iterations(float(cfg.teacher.warmup_teacher_temp_epochs) * epoch),
            stop_iteration=stop,
        )

    def lr(self, iteration: int) -> float:
        return warmup_cosine(iteration, self.peak_lr, self.min_lr, self.total_iterations,
                             warmup_iters=self.lr_warmup_iterations)

    def last_layer_lr(self, iteration: int) -> float:
        # The reference zeroes the first epochs of the lr schedule (not a shifted schedule).
        return 0.0 if iteration < self.freeze_last_layer_iterations else self.lr(iteration)

    def wd(self, iteration: int) -> float:
        return warmup_cosine(iteration, self.weight_decay, self.weight_decay_end, self.total_iterations)

    def momentum(self, iteration: int) -> float:
        return warmup_cosine(iteration, self.momentum_teacher, self.final_momentum_teacher, self.total_iterations)

    def teacher_temperature(self, iteration: int) -> float:
        # Linear warmup then constant: a "cosine" whose base and final values are equal.
        return warmup_cosine(iteration, self.teacher_temp, self.teacher_temp, self.teacher_temp_warmup_iterations,
                             warmup_iters=self.teacher_temp_warmup_iterations,
                             start_warmup_value=self.warmup_teacher_temp)

    def at(self, iteration: int) -> Dict[str, float]:
        """dict(lr, wd, momentum, teacher_temp, last_layer_lr) for the optimiser step `iteration` (0-based)."""
        return {
            "lr": self.lr(iteration),
            "wd": self.wd(iteration),
            "momentum": self.momentum(iteration),
            "teacher_temp": self.teacher_temperature(iteration),
            "last_layer_lr": self.last_layer_lr(iteration),
        }
