"""The pretraining engine: one entry point for CPU, one GPU, and torchrun/srun (DDP or FSDP2), any precision.

    dinov2-repro train --config configs/train/X.yaml [--output-dir DIR] [--resume | --no-resume] [key=value ...]
    torchrun --nproc-per-node 8 -m dinov2_repro.train --config ... compute.parallelism=fsdp

`train(cfg)` builds everything from the config, resumes from ``<run>/checkpoints/latest`` when present, and
writes the run directory::

    run.lock             held while a run trains here (`run_dir.RunLock`)
    config.yaml          resolved config (restart with --config run/config.yaml alone)
    train.log            start-up report, periodic metrics, warnings
    metrics.jsonl        one JSON record per log period (losses, schedules, throughput, memory, diagnostics)
    checkpoints/         checkpoint_<iter>.pth (or DCP folders under FSDP) + `latest` (see checkpoint.py)
    export/              teacher_backbone.pth (hub layout, strict-loadable) + backbone.json
    loss_curves.png      losses and schedules (end of training)
    summary.json         iterations, final losses, images/s, skipped files

This module is the entry (parse, config, run). The rest of the engine, one concern per module:
`run_dir` (lock, config, summary, export), `loop` (set-up and the loop), `step` (one optimiser step),
`logs`, `signals` (Ctrl-C / SIGTERM: finish the step, checkpoint, stop), `checkpoint`, `metrics`, `guards`.

One iteration = one optimiser step (`step.train_one_iteration`, DINO v1's main_dino.py order). Gradient accumulation
(``train.grad_accum_steps`` = k) feeds k micro-batches of ``batch_size_per_gpu`` per rank before each step:

* each loss is the mean over its micro-batch and is divided by k before backward, so the gradient is the mean
  over the k x world x batch images, as with one big batch;
* DINO/iBOT softmax-centering centers are updated once per micro-batch (k EMA updates per step, each with that
  micro-batch's mean over all ranks); Sinkhorn-Knopp normalises over one micro-batch x all ranks; KoLeo finds
  nearest neighbours within one micro-batch of one rank (as in the reference, never across ranks);
* the teacher EMA, the schedules and the checkpoints count optimiser steps, not micro-batches.

The data sampler position is a function of the iteration (``iteration x batch_size_per_gpu x k`` samples per
rank), the schedules too, and checkpoints hold the RNG states, so a resumed run repeats the original exactly.

Devices and precision: ``compute.device`` auto | cpu | cuda; ``compute.parallelism`` none | ddp | fsdp, with
the policy in `dinov2_repro.distributed.parallelize` (gloo on CPU, NCCL on CUDA; launch with torchrun or srun);
``compute.precision`` fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, whose state is checkpointed; an
overflow lowers the scale and skips that step on every rank). Combinations that cannot work fail at start-up
with a message naming the config key (`guards.check_setup`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from dinov2_repro.distributed.env import detect_env, init_distributed, teardown

from .logs import log, run_logging
from .loop import build_run, summarize, train_loop
from .run_dir import (RunDirError, RunLock, export_teacher_backbone, read_summary, resolved_for_run, write_summary,
                      writing)
from .signals import StopSignals


def train(cfg, output_dir: Optional[os.PathLike] = None, resume: bool = True, *,
          data_loader_fn: Optional[Callable[..., Iterable[dict]]] = None) -> Dict[str, Any]:
    """Pretrain from ``cfg`` (a validated config from `load_config`); returns the summary dict (rank 0 writes
    it to ``summary.json``; every rank returns it).

    ``output_dir`` defaults to ``train.output_dir``. With ``resume`` (default) the run continues from
    ``<output_dir>/checkpoints/latest`` when it exists; ``resume=False`` refuses a directory that already holds
    checkpoints rather than overwriting them. ``data_loader_fn(cfg, rank, world_size, start_batch)`` replaces
    the default `dinov2_repro.data.build_ssl_data_loader` (same arguments: ``start_batch`` = loader batches
    already consumed = iteration x grad_accum_steps); tests feed fixed batches with it.

    Works in a single process, and under torchrun or srun (the process group is created here if the launcher
    variables say so, and destroyed at the end if created here).
    """
    dist_env = detect_env()
    created_group = False
    if dist_env.is_distributed and not dist.is_initialized():
        device_type = "cuda" if cfg.compute.device != "cpu" and torch.cuda.is_available() else "cpu"
        init_distributed(dist_env, device_type=device_type)
        created_group = True
    elif dist.is_available() and dist.is_initialized() and not dist_env.is_distributed:
        # A process group created by the caller without launcher variables: its ranks are the truth.
        dist_env = dataclasses.replace(dist_env, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                       source="external")
    run_dir = Path(output_dir or cfg.train.output_dir).absolute()
    lock = RunLock(run_dir)
    try:
        _take_run_dir(run_dir, lock, dist_env.is_main)
        with run_logging(run_dir, dist_env.is_main, dist_env.rank), StopSignals() as stop:
            return _train(resolved_for_run(cfg, run_dir), run_dir, resume, dist_env, data_loader_fn, stop)
    finally:
        lock.release()
        if created_group:
            teardown()


def _take_run_dir(run_dir: Path, lock: RunLock, is_main: bool) -> None:
    """Rank 0 creates and locks the run directory; every rank learns the outcome (and raises the same error)."""
    error = None
    if is_main:
        try:
            with writing("the run directory", run_dir):
                run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except RunDirError as exc:
            error = str(exc)
    if dist.is_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise RunDirError(error)


def _train(cfg, run_dir: Path, resume: bool, dist_env, data_loader_fn, stop: StopSignals) -> Dict[str, Any]:
    run = build_run(cfg, run_dir, resume, dist_env, data_loader_fn, stop)
    if run.start_iter >= run.total_iters:  # a finished run: report it as it was, rewrite nothing
        log.info("the run is complete (checkpoint at iteration %d of %d): nothing to train; raise optim.epochs or "
                 "train.iterations (or train.max_iterations within the schedule) to extend it", run.start_iter, run.total_iters)
        previous = read_summary(run_dir)
        if previous is not None:
            return previous
        export_teacher_backbone(run.step.meta_arch, cfg, run_dir, run.start_iter, run.is_main)  # stopped early
        result = None
    else:
        result = train_loop(run, stop)
    summary = summarize(run, result)
    if run.is_main:
        from .metrics import plot_loss_curves

        plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
        write_summary(run_dir, summary)
        log.info("done: %d iterations, %s images/s; summary in %s", summary["iterations"],
                 f"{summary['images_per_s']:.1f}" if summary["images_per_s"] else "n/a", run_dir / "summary.json")
    return summary


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-repro train",
        description="DINOv2 pretraining. Single process: `dinov2-repro train --config X.yaml`; several GPUs: "
                    "`torchrun --nproc-per-node N -m dinov2_repro.train --config X.yaml compute.parallelism=fsdp`.",
    )
    parser.add_argument("--config", default=None, help="preset name (demo_cpu, vits14_brain_mri, ...) or YAML file "
                                                        "(a run's config.yaml restarts it); default: the published "
                                                        "defaults only")
    parser.add_argument("--output-dir", default=None, help="run directory (default: train.output_dir)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from <output-dir>/checkpoints/latest when present (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch; refuses a directory that already holds checkpoints")
    parser.add_argument("--data", default=None, metavar="DIR_OR_CSV",
                        help="the images to pretrain on; same as data.path=... (labels, if any, are not used)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logging.progress_bar=false)")
    parser.add_argument("--iterations", type=int, default=0, metavar="N",
                        help="train for N iterations with every schedule (lr warm-up, last-layer freeze, teacher "
                             "temperature, the cosines) scaled to fit: the way to shorten a run; same as "
                             "train.iterations=N. train.max_iterations=N instead stops early and cuts the schedules")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    return parser


def flag_overrides(args) -> List[str]:
    """The CLI flags as config overrides, before the explicit key=value ones (which win)."""
    overrides = [f"data.path={args.data}"] if args.data else []
    overrides += ["logging.progress_bar=false"] if args.no_progress else []
    return overrides + ([f"train.iterations={args.iterations}"] if args.iterations else [])


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit status (0 ok, 1 non-finite loss, 2 bad config/environment)."""
    from dinov2_repro.config import ConfigError, load_config
    from dinov2_repro.data.collate import UndecodableBatchError
    from dinov2_repro.distributed.env import DistEnvError
    from dinov2_repro.models.weights import WeightsError

    from .checkpoint import CheckpointError
    from .guards import NonFiniteLossError
    from .signals import TrainingStopped

    args = build_parser().parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = load_config(args.config, flag_overrides(args) + args.overrides)
        train(cfg, output_dir=args.output_dir, resume=args.resume)
    except (ConfigError, DistEnvError, FileNotFoundError, CheckpointError, RunDirError, WeightsError) as error:
        print(f"dinov2-repro train: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a read or write outside the run directory's own guarded writes
        where = f": {error.filename}" if error.filename and error.strerror else ""
        print(f"dinov2-repro train: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        print(f"dinov2-repro train: {error}", file=sys.stderr)
        return error.exit_code
    except UndecodableBatchError as error:  # from a loader worker the message carries its traceback: last line
        message = str(error).strip().splitlines()[-1].split("UndecodableBatchError: ", 1)[-1]
        print(f"dinov2-repro train: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"dinov2-repro train: {error}", file=sys.stderr)
        return 1
    return 0
