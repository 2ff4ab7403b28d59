"""The training loop, as DINO's ``train_one_epoch``: for each iteration take the batches, run one step
(`step.train_one_iteration`: schedules, forward, backward, finite check, clip, optimiser step, EMA), log,
checkpoint and export; and the set-up it needs (`build_run`).

The data sampler position is a function of the iteration (``iteration x batch_size_per_gpu x k`` samples per
rank), the schedules too, and checkpoints hold the RNG states, so a resumed run repeats the original exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .guards import CollapseMonitor, NonFiniteLossError, check_setup
from .logs import log_period, log_start
from .metrics import MetricsLogger, Throughput, peak_memory_mb
from .run_dir import export_teacher_backbone, write_config, writing
from .schedules import Schedules
from .signals import StopSignals, TrainingStopped
from .step import SAVE_KEY, STOP_KEY, StepContext, train_one_iteration

log = logging.getLogger("dinov2_repro.train")

SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


@dataclasses.dataclass
class Run:
    """Everything one training run holds while it trains."""
    cfg: Any
    run_dir: Path
    dist_env: Any
    device: torch.device
    step: StepContext
    start_iter: int
    total_iters: int
    data_iter: Iterator[dict]
    counters: Dict[str, Any]  # skipped batches, fp16 overflows, unreadable files: carried across resumes
    skipped: Dict[str, Any]  # unreadable files seen by this rank: {"count", "paths"}

    @property
    def world(self) -> int:
        return self.dist_env.world_size

    @property
    def k(self) -> int:
        return int(self.cfg.train.grad_accum_steps)

    @property
    def global_batch(self) -> int:
        return int(self.cfg.train.batch_size_per_gpu) * self.world * self.k

    @property
    def is_main(self) -> bool:
        return self.dist_env.is_main


# ------------------------------------------------------------------------------------------------- set-up
def resolve_device(cfg, dist_env) -> torch.device:
    wanted = cfg.compute.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            from dinov2_repro.config import ConfigError

            raise ConfigError("compute.device = 'cuda' but no CUDA device is visible (use compute.device=cpu)")
        return torch.device("cuda", dist_env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_meta_arch(cfg, device, parallel, mesh=None):
    """The SSL meta-architecture on ``device`` with the compute (compile / activation checkpointing) and
    parallelism policies applied, and its AdamW optimiser (built after sharding: FSDP replaces parameters)."""
    from dinov2_repro.distributed.compile import apply_compute_policies

    from .meta_arch import SSLMetaArch
    from .param_groups import build_optimizer

    meta_arch = SSLMetaArch(cfg).to(device)
    meta_arch.train()
    apply_compute_policies(meta_arch, compile=bool(cfg.compute.compile),
                           activation_checkpointing=bool(cfg.compute.activation_checkpointing))
    parallel.prepare(meta_arch, mesh=mesh)
    optimizer = build_optimizer(meta_arch.get_params_groups(), cfg, device=device)
    return meta_arch, optimizer


def default_data_loader(cfg, rank: int, world_size: int, start_batch: int) -> Iterable[dict]:
    """The config's SSL loader for this rank, positioned after ``start_batch`` loader batches
    (= completed iterations x train.grad_accum_steps): this rank skips start_batch x batch_size_per_gpu samples."""
    from dinov2_repro.data import build_ssl_data_loader

    return build_ssl_data_loader(cfg, rank, world_size, start_batch)


def _step_context(cfg, device, world: int, global_batch: int, stop: StopSignals) -> StepContext:
    """Model, optimiser, scaler and policies; the same initial weights on every rank."""
    from dinov2_repro.distributed.parallelize import Parallelism

    precision = str(cfg.compute.precision)
    parallel = Parallelism(str(cfg.compute.parallelism), precision, str(cfg.compute.param_dtype))
    mesh = None
    if parallel.sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    meta_arch, optimizer = build_meta_arch(cfg, device, parallel, mesh)
    return StepContext(meta_arch, optimizer, torch.amp.GradScaler(device.type, enabled=(precision == "fp16")),
                       Schedules.from_config(cfg, global_batch), parallel, autocast_factory(device, precision),
                       float(cfg.optim.clip_grad), str(cfg.train.nonfinite), stop.requested)


def build_run(cfg, run_dir: Path, resume: bool, dist_env, data_loader_fn, stop: StopSignals) -> Run:
    """Check the set-up, write config.yaml, build the model and resume from the newest loadable checkpoint."""
    device = resolve_device(cfg, dist_env)
    rank, world = dist_env.rank, dist_env.world_size
    check_setup(cfg, device.type, world, "single" if not dist.is_initialized() else dist_env.source)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        from dinov2_repro.config import ConfigError

        raise ConfigError(f"{run_dir} already holds checkpoints (latest: {latest.name}); resume it (--resume, the "
                          "default) or choose another --output-dir; --no-resume never overwrites a run")
    if dist_env.is_main:
        write_config(cfg, run_dir, resuming=latest is not None)
    global_batch = int(cfg.train.batch_size_per_gpu) * world * int(cfg.train.grad_accum_steps)
    seed_everything(int(cfg.train.seed))
    step = _step_context(cfg, device, world, global_batch, stop)
    seed_everything(int(cfg.train.seed) + rank)  # per-rank random streams (drop path, masks), as the reference
    counters = {"skipped_batches": 0, "fp16_overflow_steps": 0, "skipped_files": 0, "skipped_paths": []}
    start_iter, meta = 0, {}
    if latest is not None:
        latest, meta = ckpt.load_newest_loadable(run_dir, step.meta_arch, step.optimizer, step.scaler)
        start_iter = int(meta["iteration"])
        counters.update(meta.get("counters", {}))
        if meta.get("global_batch") not in (None, global_batch):
            log.warning("resuming with global batch %d but the checkpoint was trained with %s: the data order "
                        "and the lr scaling differ from the original run", global_batch, meta.get("global_batch"))
        log.info("resumed from %s at iteration %d", latest, start_iter)
    k = int(cfg.train.grad_accum_steps)
    data_iter = iter((data_loader_fn or default_data_loader)(cfg, rank, world, start_iter * k))  # loader batches
    if meta:  # after creating the loader iterator, which draws its base seed from the global RNG
        ckpt.restore_rank_rng(meta, rank, world)
    # Unreadable files seen by this rank; the totals of earlier segments of the run are carried by rank 0.
    skipped = {"count": int(counters["skipped_files"]) if dist_env.is_main else 0,
               "paths": set(counters["skipped_paths"]) if dist_env.is_main else set()}
    run = Run(cfg, run_dir, dist_env, device, step, start_iter, step.schedules.stop_iteration, data_iter,
              counters, skipped)
    if run.is_main:
        log_start(run)
    return run


# ------------------------------------------------------------------------------------------------- the loop
class Period:
    """Averages over one log period of the updates that happened (schedules: their last value)."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = defaultdict(float)
        self.count, self.throughput = 0, Throughput()

    def reset(self) -> None:
        self.sums.clear()
        self.count = 0
        self.throughput.reset()

    def add(self, values: Dict[str, Any], n_images: int, data_time: float, step_time: float) -> None:
        self.throughput.add(n_images, data_time, step_time)
        if values["status"] != "ok":
            return
        for key, value in values.items():
            if isinstance(value, float) and key not in SCHEDULE_KEYS and key not in (STOP_KEY, SAVE_KEY):
                self.sums[key] += value
        self.count += 1

    def record(self, run: Run, done: int, last: Dict[str, float]) -> Dict[str, Any]:
        record = {"iteration": done, **{key: last[key] for key in SCHEDULE_KEYS},
                  **{key: total / self.count for key, total in self.sums.items()},
                  **self.throughput.summary(), "peak_memory_mb": peak_memory_mb(run.device.type),
                  "skipped_batches": run.counters["skipped_batches"],
                  "fp16_overflow_steps": run.counters["fp16_overflow_steps"],
                  "skipped_files": all_ranks_skipped(run.skipped, with_paths=False)[0]}
        if run.step.scaler.is_enabled():
            record["grad_scale"] = float(run.step.scaler.get_scale())
        self.reset()
        return record


def train_loop(run: Run, stop: StopSignals) -> Dict[str, Any]:
    """Train from ``run.start_iter`` to the end; returns the last iteration's values and the throughput."""
    cfg = run.cfg
    metrics = MetricsLogger(run.run_dir, cfg, run.is_main, run.start_iter, run.total_iters)
    collapse = CollapseMonitor(int(cfg.dino.head_n_prototypes), int(cfg.logging.collapse_patience_iterations),
                               embed_dim=int(run.step.meta_arch.student["backbone"].embed_dim),
                               images_per_batch=int(cfg.train.batch_size_per_gpu))
    period, last, totals = Period(), {}, {"images": 0, "seconds": 0.0}
    timer = SaveTimer(float(cfg.checkpoint.period_minutes))
    run.step = dataclasses.replace(run.step, save_due=timer.due)
    try:
        for it in range(run.start_iter, run.total_iters):
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(run.data_iter, run.k, run.skipped)
            t_data = time.perf_counter() - t0
            values = _one_iteration(run, it, micro_batches)
            step_time, n_images = time.perf_counter() - t0, images_in(micro_batches) * run.world
            period.add(values, n_images, t_data, step_time)
            totals["images"] += n_images
            totals["seconds"] += step_time
            done, last = it + 1, {key: v for key, v in values.items() if isinstance(v, float)}
            warning = collapse.update(it, last.get("teacher_entropy"), last.get("student_cls_std"),
                                      last.get("teacher_kl_to_uniform"))
            if warning and run.is_main:
                log.warning("%s", warning)
            metrics.step(done, {"loss": last.get("total_loss", float("nan")), "lr": last["lr"]})
            stopping, timed_save = values.get(STOP_KEY, 0.0) > 0, values.get(SAVE_KEY, 0.0) > 0
            if done % int(cfg.logging.log_period_iterations) == 0 or done == run.total_iters or stopping:
                record = period.record(run, done, last)
                with writing("metrics", run.run_dir / "metrics.jsonl"):
                    metrics.log(record)
                if run.is_main:
                    log_period(record, run.total_iters)
            if done % int(cfg.checkpoint.period_iterations) == 0 or done == run.total_iters or stopping or timed_save:
                path = save_checkpoint(run, done)
                timer.restart()
            if done % int(cfg.evaluation.eval_period_iterations) == 0 or done == run.total_iters:
                export_teacher_backbone(run.step.meta_arch, cfg, run.run_dir, done, run.is_main)
            if stopping and done < run.total_iters:
                raise TrainingStopped(stop.received or "SIGTERM", done, str(path))
    finally:
        metrics.close()
    return dict(last=last, **totals)


class SaveTimer:
    """``due()`` once ``minutes`` of training passed since the last checkpoint (never with minutes = 0)."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.restart()

    def restart(self) -> None:
        self.start = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.start >= self.seconds


def _one_iteration(run: Run, it: int, micro_batches: List[dict]) -> Dict[str, Any]:
    """The step, with its outcome counted and a NaN error naming the checkpoint that stays the last good state."""
    try:
        values = train_one_iteration(it, micro_batches, run.step)
    except NonFiniteLossError as error:
        last_good = ckpt.latest_checkpoint(run.run_dir)
        error = NonFiniteLossError(error.term, error.iteration, error.value, str(last_good or "") or None)
        log.error("%s", error)
        raise error from None
    if values["status"] == "skipped":
        run.counters["skipped_batches"] += 1
        log.warning("iteration %d: non-finite %s, update skipped (train.nonfinite=skip_batch; %d so far)",
                    it, values["nonfinite_term"], run.counters["skipped_batches"])
    elif values["status"] == "fp16_overflow":
        run.counters["fp16_overflow_steps"] += 1
    return values


def save_checkpoint(run: Run, iteration: int) -> Path:
    """A checkpoint of ``iteration`` with the counters and the batch arithmetic (collective)."""
    from dinov2_repro.config import config_to_dict

    total, paths = all_ranks_skipped(run.skipped)
    run.counters.update(skipped_files=total, skipped_paths=sorted(paths))
    per_gpu = int(run.cfg.train.batch_size_per_gpu)
    meta = {"config": config_to_dict(run.cfg), "counters": dict(run.counters), "global_batch": run.global_batch,
            "batch_size_per_gpu": per_gpu, "grad_accum_steps": run.k,
            "samples_per_rank": iteration * per_gpu * run.k}
    with writing("a checkpoint", ckpt.checkpoints_dir(run.run_dir)):
        return ckpt.save_checkpoint(run.run_dir, iteration, run.step.meta_arch, run.step.optimizer, meta,
                                    sharded=run.step.parallel.sharded, keep_last=int(run.cfg.checkpoint.keep_last),
                                    scaler=run.step.scaler)


def next_micro_batches(data_iter: Iterator[dict], k: int, skipped: Dict[str, Any]) -> List[dict]:
    batches = []
    for _ in range(k):
        batch = next(data_iter)
        skipped["count"] += int(batch.get("n_skipped", 0) or 0)
        for path in batch.get("skipped_paths", None) or []:
            skipped["paths"].add(str(path))
        batches.append(batch)
    return batches


def images_in(batches: List[dict]) -> int:
    return sum(int(b["collated_global_crops"].shape[0]) // 2 for b in batches)


def all_ranks_skipped(skipped: Dict[str, Any], with_paths: bool = True):
    """(total count, union of paths) of the unreadable files of all ranks; collective under a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return skipped["count"], set(skipped["paths"])
    if not with_paths:  # cheap per-log-period total
        count = torch.tensor([float(skipped["count"])],
                             device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(count)
        return int(count.item()), set()
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (skipped["count"], sorted(skipped["paths"])))
    return sum(c for c, _ in everyone), {p for _, paths in everyone for p in paths}


def summarize(run: Run, result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """summary.json's content: iterations, final losses and diagnostics, throughput, skipped files, paths."""
    from .run_dir import EXPORT_DIR

    last = (result or {}).get("last", {})
    seconds = (result or {}).get("seconds", 0.0)
    total_skipped, all_paths = all_ranks_skipped(run.skipped)
    return {
        "iterations": max(run.start_iter, run.total_iters),
        "start_iteration": run.start_iter,
        "world_size": run.world,
        "global_batch": run.global_batch,
        "peak_lr": run.step.schedules.peak_lr,
        "final_losses": {key: v for key, v in last.items() if key.endswith("loss")},
        "final_diagnostics": {key: v for key, v in last.items()
                              if not key.endswith("loss") and key not in SCHEDULE_KEYS
                              and key not in (STOP_KEY, SAVE_KEY)},
        "images_per_s": result["images"] / seconds if seconds else None,
        "skipped_batches": run.counters["skipped_batches"],
        "fp16_overflow_steps": run.counters["fp16_overflow_steps"],
        "skipped_files": {"count": total_skipped, "paths": sorted(all_paths)},
        "checkpoint": str(ckpt.latest_checkpoint(run.run_dir)) if run.is_main else None,
        "export": str(run.run_dir / EXPORT_DIR / "teacher_backbone.pth"),
        "run_dir": str(run.run_dir),
    }
