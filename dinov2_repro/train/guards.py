"""Training guards: stop (or skip) on a non-finite loss, warn on representation collapse, reject bad setups.

Non-finite values: with ``train.nonfinite: stop`` (default) the engine raises `NonFiniteLossError` naming the
loss term (or ``grad_norm``) and the iteration *before* the optimiser step, so the weights, the teacher and the
last checkpoint stay those of the last good iteration. With ``skip_batch`` the update is dropped (gradients
zeroed, no optimiser step, no EMA) and the skip is counted; with fp16 the grad scaler's own inf/NaN skips
(a normal part of loss scaling) are not counted as errors.

Collapse: DINO collapses either to one prototype (teacher entropy -> 0, the student's CLS features stop
varying) or to the uniform distribution (entropy -> log K: the targets carry no per-image signal).
`CollapseMonitor` warns when either persists for ``logging.collapse_patience_iterations`` iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm is NaN/inf; carries ``term``, ``iteration`` and ``value``."""

    def __init__(self, term: str, iteration: int, value: float, checkpoint: Optional[str] = None):
        self.term, self.iteration, self.value, self.checkpoint = term, iteration, value, checkpoint
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite {term} = {value} at iteration {iteration}; training stopped without updating the "
            f"weights ({where}). Lower optim.base_lr, keep optim.clip_grad > 0, prefer compute.precision=bf16 "
            f"or fp32 to fp16, or set train.nonfinite=skip_batch to drop such batches."
        )


def first_nonfinite(values: Mapping[str, float]) -> Optional[str]:
    """Name of the first entry of ``values`` that is NaN or inf (None when all are finite)."""
    for name, value in values.items():
        if not math.isfinite(value):
            return name
    return None


# What was measured to matter at small scale (docs/small_scale.md), most effective first.
UNIFORM_ADVICE = (
    "First the lr: below batch 1024 use optim.scaling_rule=sqrt_wrt_1024 (peak lr 0.004 x sqrt(batch / 1024)); "
    "unscaled at batch 32 the features ended worse than random. Short runs from a random init can stay uniform "
    "even then, because a random network's CLS signal is weak and differs between views of one image: a lower "
    "teacher.teacher_temp (0.02) sharpens it, and on scans data.intensity_jitter=false kept two views of one "
    "image closer than two images. On images of a few dozen pixels keep crops.min_source_px_per_patch >= 1: "
    "with it the teacher of 8 x 8 scans left the uniform state (0 turns it off). Keep koleo.loss_weight > 0: "
    "without it that teacher went uniform again. In a short run do not raise teacher.momentum_teacher (the "
    "small-batch advice for long runs): at 0.996 over 600 iterations the teacher lagged and DINO barely engaged. "
    "Prototype count, Sinkhorn-Knopp, the head and the last-layer freeze did not help in those runs. When k-NN "
    "on the features still improves, iBOT and KoLeo are carrying the learning.")


# The teacher's EMA horizon as a share of the run above which it lags the student for most of it: on real digits
# (600 iterations, docs/small_scale.md) horizons of 8 % of the run did best, 17 % less well, 42 % lost 7-10 points.
TEACHER_LAG_SHARE = 0.25
# Below this a tenth of the run is under 10 iterations, a near copy of the student: such runs are smoke tests.
TEACHER_LAG_MIN_ITERATIONS = 100


def teacher_lag_warning(momentum: float, total_iterations: int, final_momentum: float = 1.0) -> Optional[str]:
    """A warning when ``teacher.momentum_teacher`` averages the teacher over more than a quarter of the run.

    The EMA horizon is 1 / (1 - m) iterations; the cosine to ``final_momentum`` puts m half-way by mid-run."""
    if total_iterations < TEACHER_LAG_MIN_ITERATIONS:
        return None
    suggestion = math.floor(1000 * (1.0 - 10.0 / total_iterations)) / 1000
    advice = f"teacher.momentum_teacher={suggestion:g} here; docs/launching.md, section 5"
    if momentum >= 1.0:
        if final_momentum >= 1.0:
            return (f"teacher.momentum_teacher={momentum:g} never updates the teacher: it stays the random network it "
                    f"started as ({advice})")
        return (f"teacher.momentum_teacher={momentum:g} freezes the teacher at the start: it stays the random network "
                f"until the cosine to teacher.final_momentum_teacher={final_momentum:g} brings the momentum below 1 "
                f"({advice})")
    horizon = 1.0 / (1.0 - momentum)
    if horizon <= TEACHER_LAG_SHARE * total_iterations:
        return None
    mid_run = 1.0 / (1.0 - (momentum + final_momentum) / 2)  # final_momentum <= 1: the loader checks its range
    return (f"teacher.momentum_teacher={momentum:g} averages the teacher over about {horizon:.0f} iterations at the "
            f"start ({100 * horizon / total_iterations:.0f}% of this {total_iterations}-iteration schedule) and "
            f"{mid_run:.0f} by mid-run: the teacher will lag the student and the DINO term may hardly engage. The "
            f"slow-teacher advice for small batches is for long runs; in a short one keep the horizon "
            f"1 / (1 - momentum) near a tenth of the run ({advice})")


@dataclass
class CollapseMonitor:
    """Counts consecutive iterations that look collapsed and returns a warning once the patience is reached.

    Two collapses, K prototypes, D-dim student CLS:

    * uniform: teacher entropy above ``high_entropy_frac * log K``. Every image's target is then the uniform
      distribution and the DINO loss carries no per-image signal, *even if the student CLS tokens still differ*
      (KoLeo and iBOT keep them apart while the head maps them all to one point: seen on the synthetic demo).
    * one prototype: teacher entropy below ``low_entropy_frac * log K`` *and* either a student CLS spread below
      ``min_std_frac / sqrt(D)`` (the per-dimension std of L2-normalised features is about 1/sqrt(D) when they
      are spread out, 0 when they coincide) or a batch-mean target whose entropy, log K - KL(mean target ||
      uniform), is below ``low_entropy_frac * log K``: every image then gets the same prototype, *even if the
      student CLS tokens still differ* (seen on real digits with a slow center, dino.center_momentum=0.998).
      A sharp teacher whose images pick different prototypes is healthy. The batch mean is read only with 2 or
      more images per batch (``images_per_batch``, per rank): one image's two crops rightly share a target.

    The teacher can be near-uniform for a while at initialisation, hence the patience.
    """

    n_prototypes: int
    patience: int
    embed_dim: int = 384
    images_per_batch: int = 2
    low_entropy_frac: float = 0.05
    high_entropy_frac: float = 0.98
    min_std_frac: float = 0.1
    streak: int = 0
    warned: bool = False

    def looks_collapsed(self, teacher_entropy: float, student_cls_std: float,
                        teacher_kl_to_uniform: Optional[float] = None) -> bool:
        log_k = math.log(self.n_prototypes)
        if teacher_entropy > self.high_entropy_frac * log_k:
            return True
        if teacher_entropy >= self.low_entropy_frac * log_k:
            return False
        return (self.shares_one_target(teacher_kl_to_uniform)
                or student_cls_std < self.min_std_frac / math.sqrt(self.embed_dim))

    def shares_one_target(self, teacher_kl_to_uniform: Optional[float]) -> bool:
        """Whether the batch-mean target, of entropy log K - KL(mean target || uniform), sits on one prototype:
        every image of the batch then gets the same target. Unknown (None or NaN) is not a collapse."""
        log_k = math.log(self.n_prototypes)
        return (teacher_kl_to_uniform is not None and self.images_per_batch > 1
                and log_k - teacher_kl_to_uniform < self.low_entropy_frac * log_k)

    def update(self, iteration: int, teacher_entropy: Optional[float], student_cls_std: Optional[float],
               teacher_kl_to_uniform: Optional[float] = None) -> Optional[str]:
        """Feed one iteration's diagnostics; returns a warning message the first time the streak hits patience."""
        if teacher_entropy is None or student_cls_std is None:
            return None
        if not self.looks_collapsed(teacher_entropy, student_cls_std, teacher_kl_to_uniform):
            self.streak, self.warned = 0, False
            return None
        self.streak += 1
        if self.streak < self.patience or self.warned:
            return None
        self.warned = True
        log_k = math.log(self.n_prototypes)
        if teacher_entropy < self.low_entropy_frac * log_k:
            spread = "" if teacher_kl_to_uniform is None else \
                f", the batch-mean target's entropy {log_k - teacher_kl_to_uniform:.3f}"
            kind = (f"concentrated on one prototype (entropy {teacher_entropy:.3f} ~ 0{spread}) and student CLS std "
                    f"is {student_cls_std:.2e}")
            advice = ("Centering is losing: try train.centering=sinkhorn_knopp, a higher teacher.teacher_temp or a "
                      "lower lr, and keep dino.center_momentum at the recipe's 0.9 (at 0.998 one prototype took "
                      "every image of a small-batch run).")
        else:
            kind = (f"uniform (entropy {teacher_entropy:.3f} ~ log K = {log_k:.3f}), so the DINO loss carries no "
                    f"per-image signal (student CLS std {student_cls_std:.2e})")
            advice = UNIFORM_ADVICE
        return (f"possible collapse at iteration {iteration}: teacher output is {kind} for {self.streak} "
                f"iterations. {advice} Watch teacher_entropy in metrics.jsonl; docs/small_scale.md explains the "
                "signs.")


# FSDP2 (fully_shard) on CPU with gloo, measured: torch 2.4 and 2.5 create CUDA streams unconditionally, 2.6
# records events on a CPU stream, which has none; 2.7.1 trains and checkpoints.
CPU_FSDP_MIN_TORCH = (2, 7)


def torch_version() -> tuple:
    """(major, minor) of the installed torch."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_setup(cfg, device_type: str, world_size: int, dist_source: str) -> None:
    """Reject setting combinations that cannot work, naming the config key and the fix."""
    from dinov2_repro.config import ConfigError

    precision, parallelism = cfg.compute.precision, cfg.compute.parallelism
    if device_type == "cpu" and precision == "fp16":
        raise ConfigError("compute.precision = 'fp16' needs CUDA: CPU autocast supports bf16 only "
                          "(use compute.precision=bf16 or fp32 on CPU)")
    param_dtype = cfg.compute.param_dtype
    if parallelism == "fsdp" and precision != "fp32" and param_dtype not in ("fp32", precision):
        raise ConfigError(f"compute.param_dtype = {param_dtype!r} with compute.precision = {precision!r}: FSDP "
                          f"parameters must be fp32 or the autocast dtype (set compute.param_dtype={precision})")
    if parallelism == "fsdp" and dist_source == "single":
        raise ConfigError("compute.parallelism = 'fsdp' needs a process group: launch with torchrun "
                          "(torchrun --nproc-per-node N -m dinov2_repro.train ...) or srun, or set "
                          "compute.parallelism=none for one process")
    if parallelism == "fsdp" and device_type == "cpu" and torch_version() < CPU_FSDP_MIN_TORCH:
        import torch

        raise ConfigError(f"compute.parallelism = 'fsdp' on CPU needs torch >= "
                          f"{'.'.join(map(str, CPU_FSDP_MIN_TORCH))} (torch {torch.__version__}'s FSDP2 requires "
                          f"CUDA streams): use compute.parallelism=ddp on CPU, or upgrade torch")
    if parallelism == "ddp" and dist_source == "single":
        raise ConfigError("compute.parallelism = 'ddp' needs a process group: launch with torchrun or srun, "
                          "or set compute.parallelism=none for one process")
    if parallelism == "none" and world_size > 1:
        raise ConfigError(f"compute.parallelism = 'none' but {world_size} processes were launched: "
                          "set compute.parallelism=ddp or fsdp")
    if cfg.koleo.loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        raise ConfigError(f"train.batch_size_per_gpu = {cfg.train.batch_size_per_gpu} with koleo.loss_weight = "
                          f"{cfg.koleo.loss_weight}: KoLeo needs >= 2 images per GPU to find a nearest neighbour "
                          "(raise the batch size or set koleo.loss_weight=0)")
    if cfg.student.attn_backend == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("student.attn_backend = 'xformers' but xformers is not installed "
                              "(pip install xformers, or use student.attn_backend=sdpa / auto)")
        if device_type != "cuda":
            raise ConfigError("student.attn_backend = 'xformers' needs CUDA (use sdpa or auto on CPU)")
    if device_type == "cuda" and precision == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError("compute.precision = 'bf16' but this GPU has no bf16 support: use fp16 or fp32")
