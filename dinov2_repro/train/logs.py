"""Training logs: rank 0 writes INFO to the console and ``train.log``; other ranks print warnings only. The handlers
sit on the package logger ``dinov2_repro``, so the data pipeline's records land in ``train.log`` too.

`run_logging` attaches the handlers for one run and removes them afterwards, so no logging state outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

from .guards import teacher_lag_warning
from .run_dir import writing

log = logging.getLogger("dinov2_repro.train")

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


@contextlib.contextmanager
def run_logging(run_dir: Path, is_main: bool, rank: int) -> Iterator[None]:
    formatter = logging.Formatter(LOG_FORMAT if is_main else f"[rank {rank}] " + LOG_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers = [console]
    if is_main:
        with writing("the training log", run_dir / "train.log"):
            handlers.append(logging.FileHandler(run_dir / "train.log"))
        handlers[-1].setLevel(logging.INFO)
    package = logging.getLogger("dinov2_repro")  # the engine's and the data pipeline's records alike
    saved = (package.level, package.propagate)
    for handler in handlers:
        handler.setFormatter(formatter)
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        yield
    finally:
        for handler in handlers:
            package.removeHandler(handler)
            handler.close()
        package.setLevel(saved[0])
        package.propagate = saved[1]


def log_start(run: Any) -> None:
    """The start-up report: world, device, batch arithmetic, lr, iterations and parameter counts."""
    cfg, student = run.cfg, run.step.meta_arch.student
    n_backbone = sum(p.numel() for p in student["backbone"].parameters())
    n_heads = sum(p.numel() for name, m in student.items() if name != "backbone" for p in m.parameters())
    log.info("world size %d (%s), device %s, precision %s, parallelism %s", run.world, run.dist_env.source,
             run.device, cfg.compute.precision, run.step.parallel.kind)
    log.info("global batch %d = %d per process x %d processes x %d accumulation steps; peak lr %.6g "
             "(base %g, rule %s)", run.global_batch, int(cfg.train.batch_size_per_gpu), run.world, run.k,
             run.step.schedules.peak_lr, cfg.optim.base_lr, cfg.optim.scaling_rule)
    log.info("iterations %d -> %d; parameters: student backbone %s, heads %s", run.start_iter, run.total_iters,
             f"{n_backbone:,}", f"{n_heads:,}")
    log.info("run directory %s", run.run_dir)
    sched = run.step.schedules
    lag = teacher_lag_warning(sched.momentum_teacher, sched.total_iterations, sched.final_momentum_teacher)
    if lag:
        log.warning(lag)
    if sched.stop_iteration < sched.total_iterations:
        frozen = sched.stop_iteration <= sched.freeze_last_layer_iterations
        log.warning("train.max_iterations=%d cuts the %d-iteration schedule: the run stops with the lr at %.3g "
                    "(peak %.3g)%s; to fit every schedule into a short run, use train.iterations=%d instead",
                    sched.stop_iteration, sched.total_iterations, sched.lr(sched.stop_iteration - 1), sched.peak_lr,
                    ", the head's last layer never trained" if frozen else "", sched.stop_iteration)


def log_period(record: Dict[str, Any], total_iters: int) -> None:
    nan = float("nan")
    log.info("it %d/%d  total_loss %.4f  dino %.4f  ibot %.4f  koleo %.4f  lr %.3g  %.1f img/s",
             record["iteration"], total_iters, record.get("total_loss", nan), record.get("dino_loss", nan),
             record.get("ibot_loss", nan), record.get("koleo_loss", nan), record["lr"], record["images_per_s"])
