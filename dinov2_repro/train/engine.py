"""The pretraining engine: one entry point for CPU, one GPU, and torchrun/srun (DDP or FSDP2), any precision.

    dinov2-repro train --config configs/train/X.yaml [--output-dir DIR] [--resume | --no-resume] [key=value ...]
    torchrun --nproc-per-node 8 -m dinov2_repro.train --config ... compute.parallelism=fsdp

`train(cfg)` builds everything from the config, resumes from ``<run>/checkpoints/latest`` when present, and
writes the run directory::

    config.yaml          resolved config (restart with --config run/config.yaml alone)
    train.log            start-up report, periodic metrics, warnings
    metrics.jsonl        one JSON record per log period (losses, schedules, throughput, memory, diagnostics)
    checkpoints/         checkpoint_<iter>.pth (or DCP folders under FSDP) + `latest` (see checkpoint.py)
    export/              teacher_backbone.pth (hub layout, strict-loadable) + backbone.json
    loss_curves.png      losses and schedules (end of training)
    summary.json         iterations, final losses, images/s, skipped files

One iteration = one optimiser step (`train_one_iteration`, DINO v1's main_dino.py order). Gradient accumulation
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
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

log = logging.getLogger("dinov2_repro.train")

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
EXPORT_DIR = "export"
SCHEDULE_KEYS = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


# ------------------------------------------------------------------------------------------------- the step
def train_one_iteration(it: int, micro_batches: List[dict], meta_arch, optimizer, scaler, schedules, parallel,
                        autocast, clip_grad: float, nonfinite: str) -> Dict[str, Any]:
    """One optimiser step over ``micro_batches``; returns the (all-rank mean) loss terms, diagnostics, grad
    norms, the schedule values and ``status`` ("ok" | "skipped" | "fp16_overflow").

    Raises `NonFiniteLossError` (weights untouched) on a NaN/inf loss or gradient when ``nonfinite == "stop"``.
    """
    from .guards import NonFiniteLossError, first_nonfinite
    from .param_groups import apply_optim_schedule, clip_grad_norms

    # Every hyper-parameter is a function of the iteration, so a resumed run gets the same values.
    sched = schedules.at(it)
    apply_optim_schedule(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])  # x lr_mult; frozen last layer
    optimizer.zero_grad(set_to_none=True)
    loss_buffers = _snapshot_loss_buffers(meta_arch)  # a skipped batch must not move the centers either
    k = len(micro_batches)
    terms = []
    for i, batch in enumerate(micro_batches):
        with autocast():
            out = meta_arch.training_step(batch, teacher_temp=sched["teacher_temp"])  # teacher, student, losses
        parallel.after_forward(meta_arch)  # FSDP: re-shard the teacher's gathered parameters
        parallel.before_backward(meta_arch, last_micro_batch=(i == k - 1))  # reduce grads on the last only
        scaler.scale(out["total_loss"] / k).backward()  # mean over micro-batches; fp16: scaled against underflow
        parallel.after_backward(meta_arch, last_micro_batch=(i == k - 1))  # DDP: average grads over ranks
        terms.append({key: value.detach().float() for key, value in out.items()})
    scaler.unscale_(optimizer)  # true gradients for clipping and the finite check (no-op without fp16)
    grad_norms = clip_grad_norms(dict(meta_arch.student.items()), clip_grad)  # per sub-module, as the reference
    values = _global_means(terms, grad_norms)  # one all-reduce and one host sync per iteration
    values.update(sched)
    bad = first_nonfinite(_loss_terms_first(values))
    bad_grad = first_nonfinite({key: v for key, v in values.items() if key.startswith("grad_norm")})
    overflow = bad is None and bad_grad is not None and scaler.is_enabled()  # fp16: lower the scale, retry
    bad = bad or (None if overflow else bad_grad)
    if bad is not None and nonfinite == "stop":
        raise NonFiniteLossError(bad, it, values[bad])
    if bad is not None or overflow:  # drop this update on every rank alike: no step, no EMA, centers restored
        optimizer.zero_grad(set_to_none=True)
        _restore_loss_buffers(meta_arch, loss_buffers)
        if scaler.is_enabled():  # same back-off on all ranks, whatever each rank's shard of the grads held
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return dict(values, status="fp16_overflow" if overflow else "skipped", nonfinite_term=bad)
    scaler.step(optimizer)
    scaler.update()
    meta_arch.update_teacher(sched["momentum"])  # EMA teacher follows the updated student
    return dict(values, status="ok")


def _loss_terms_first(values: Dict[str, float]) -> Dict[str, float]:
    """Loss terms in the order a NaN should be reported: each objective, its parts, then their sum."""
    order = ["dino_loss", "ibot_loss", "koleo_loss"]
    order += sorted(k for k in values if k.endswith("loss") and k not in order and k != "total_loss")
    order += ["total_loss"]
    return {key: values[key] for key in order if key in values}


def _snapshot_loss_buffers(meta_arch) -> Dict[str, Any]:
    return {name: buf.clone() for name, buf in meta_arch.named_buffers()
            if not name.startswith(("student.", "teacher."))}


def _restore_loss_buffers(meta_arch, snapshot: Dict[str, Any]) -> None:
    buffers = dict(meta_arch.named_buffers())
    for name, value in snapshot.items():
        buffers[name].copy_(value)


def _global_means(terms: List[Dict[str, Any]], grad_norms: Dict[str, Any]) -> Dict[str, float]:
    """Mean over micro-batches and ranks of every scalar the step produced, plus the (global) grad norms."""
    import torch
    import torch.distributed as dist

    keys = sorted(terms[0])
    local = torch.stack([torch.stack([t[key].reshape(()) for key in keys]) for t in terms]).mean(0)
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


# ------------------------------------------------------------------------------------------------- set-up
def _resolve_device(cfg, dist_env):
    import torch

    wanted = cfg.compute.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            from dinov2_repro.config import ConfigError

            raise ConfigError("compute.device = 'cuda' but no CUDA device is visible (use compute.device=cpu)")
        return torch.device("cuda", dist_env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _autocast_factory(device, precision: str) -> Callable[[], Any]:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _setup_logging(run_dir: Path, is_main: bool) -> List[logging.Handler]:
    """Rank 0 logs INFO to the console and to train.log; other ranks log warnings only. Returns the handlers
    so `train` can remove them (no logging state outlives a run)."""
    formatter = logging.Formatter(LOG_FORMAT if is_main else "[rank %(rank)s] " + LOG_FORMAT)
    handlers: List[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers.append(console)
    if is_main:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    else:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        console.addFilter(lambda record: setattr(record, "rank", rank) or True)
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def _resolved_for_run(cfg, output_dir: Path):
    """A copy of ``cfg`` that restarts this run from any working directory: train.output_dir is the run
    directory actually used, data.path and student.pretrained_weights are absolute."""
    from omegaconf import OmegaConf

    update = {"train": {"output_dir": str(output_dir)}}
    if cfg.data.path and "://" not in str(cfg.data.path):
        update["data"] = {"path": str(Path(cfg.data.path).absolute())}
    if cfg.student.pretrained_weights:
        update["student"] = {"pretrained_weights": str(Path(cfg.student.pretrained_weights).absolute())}
    cfg = OmegaConf.merge(cfg, update)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _config_differences(old_path: Path, cfg) -> List[str]:
    from omegaconf import OmegaConf

    from dinov2_repro.config import config_to_dict

    def flat(d, prefix=""):
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old = flat(OmegaConf.to_container(OmegaConf.load(old_path), resolve=True))
    new = flat(config_to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def _default_data_loader(cfg, rank: int, world_size: int, start_batch: int) -> Iterable[dict]:
    """The config's SSL loader for this rank, positioned after ``start_batch`` loader batches
    (= completed iterations x train.grad_accum_steps): this rank skips start_batch x batch_size_per_gpu samples."""
    from dinov2_repro.data import build_ssl_data_loader

    return build_ssl_data_loader(cfg, rank, world_size, start_batch)


# ------------------------------------------------------------------------------------------------- export
def backbone_description(cfg, backbone) -> Dict[str, Any]:
    """``export/backbone.json``: everything needed to rebuild the backbone for the exported state dict."""
    n_pos = backbone.pos_embed.shape[1] - 1
    side = int(round(math.sqrt(n_pos)))
    return {
        "arch": str(cfg.student.arch),
        "patch_size": int(backbone.patch_size),
        "num_register_tokens": int(backbone.num_register_tokens),
        "ffn_layer": str(cfg.student.ffn_layer),
        "img_size": side * int(backbone.patch_size),
        "interpolate_offset": float(backbone.interpolate_offset),
        "interpolate_antialias": bool(backbone.interpolate_antialias),
        "embed_dim": int(backbone.embed_dim),
        # Beyond the hub variants (custom tiny ViTs) these rebuild the exact module:
        "depth": int(backbone.n_blocks),
        "num_heads": int(backbone.num_heads),
        "layerscale": float(cfg.student.layerscale),
        "qkv_bias": bool(cfg.student.qkv_bias),
        "proj_bias": bool(cfg.student.proj_bias),
        "ffn_bias": bool(cfg.student.ffn_bias),
    }


def export_teacher_backbone(meta_arch, cfg, run_dir: Path, iteration: int, is_main: bool) -> Optional[Path]:
    """Write the teacher backbone in hub layout (``export/teacher_backbone.pth``) and ``export/backbone.json``.

    Collective under FSDP (the shards are gathered to rank 0); rank 0 writes, atomically.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    backbone = meta_arch.teacher["backbone"]
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    export_dir = run_dir / EXPORT_DIR
    export_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().clone().float().cpu().contiguous() for key, value in state.items()}
    target = export_dir / "teacher_backbone.pth"
    tmp = target.with_name(target.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)
    description = dict(backbone_description(cfg, backbone), iteration=iteration)
    tmp_json = export_dir / "backbone.json.tmp"
    tmp_json.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(tmp_json, export_dir / "backbone.json")
    return target


def build_backbone_from_export(export_dir: os.PathLike):
    """A `DinoVisionTransformer` rebuilt from ``backbone.json`` with ``teacher_backbone.pth`` loaded strictly."""
    import torch

    from dinov2_repro.models.vision_transformer import DinoVisionTransformer

    export_dir = Path(export_dir)
    desc = json.loads((export_dir / "backbone.json").read_text())
    model = DinoVisionTransformer(
        img_size=desc["img_size"], patch_size=desc["patch_size"], embed_dim=desc["embed_dim"], depth=desc["depth"],
        num_heads=desc["num_heads"], qkv_bias=desc["qkv_bias"], proj_bias=desc["proj_bias"],
        ffn_bias=desc["ffn_bias"], init_values=desc["layerscale"] or None, ffn_layer=desc["ffn_layer"],
        num_register_tokens=desc["num_register_tokens"], interpolate_offset=desc["interpolate_offset"],
        interpolate_antialias=desc["interpolate_antialias"])
    state = torch.load(export_dir / "teacher_backbone.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------------- the loop
def _next_micro_batches(data_iter: Iterator[dict], k: int, skipped: Dict[str, Any]) -> List[dict]:
    batches = []
    for _ in range(k):
        batch = next(data_iter)
        skipped["count"] += int(batch.get("n_skipped", 0) or 0)
        for path in batch.get("skipped_paths", None) or []:
            skipped["paths"].add(str(path))
        batches.append(batch)
    return batches


def _images_in(batches: List[dict]) -> int:
    return sum(int(b["collated_global_crops"].shape[0]) // 2 for b in batches)


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
    import torch
    import torch.distributed as dist

    from dinov2_repro.distributed.env import detect_env, init_distributed, teardown

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
    handlers: List[logging.Handler] = []
    saved_logger_state = (log.level, log.propagate)
    try:
        run_dir = Path(output_dir or cfg.train.output_dir).absolute()
        if dist_env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        handlers = _setup_logging(run_dir, dist_env.is_main)
        return _train(_resolved_for_run(cfg, run_dir), run_dir, resume, dist_env, data_loader_fn)
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(saved_logger_state[0])
        log.propagate = saved_logger_state[1]
        if created_group:
            teardown()


def _train(cfg, run_dir: Path, resume: bool, dist_env, data_loader_fn) -> Dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dinov2_repro.config import save_config
    from dinov2_repro.distributed.parallelize import Parallelism

    from . import checkpoint as ckpt
    from .guards import CollapseMonitor, NonFiniteLossError, check_setup
    from .metrics import MetricsLogger, Throughput, peak_memory_mb, plot_loss_curves
    from .schedules import Schedules

    is_main, rank, world = dist_env.is_main, dist_env.rank, dist_env.world_size
    device = _resolve_device(cfg, dist_env)
    check_setup(cfg, device.type, world, "single" if not dist.is_initialized() else dist_env.source)
    precision, k = str(cfg.compute.precision), int(cfg.train.grad_accum_steps)
    per_gpu = int(cfg.train.batch_size_per_gpu)
    global_batch = per_gpu * world * k
    schedules = Schedules.from_config(cfg, global_batch)
    total_iters = schedules.total_iterations

    # Where to start: the latest checkpoint of this run directory, if asked to and if there is one.
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        from dinov2_repro.config import ConfigError

        raise ConfigError(f"{run_dir} already holds checkpoints (latest: {latest.name}); resume it (--resume, the "
                          "default) or choose another --output-dir; --no-resume never overwrites a run")
    if is_main:
        config_path = run_dir / "config.yaml"
        if config_path.exists() and latest is not None:
            changed = _config_differences(config_path, cfg)
            if changed:
                log.warning("config.yaml differs from the run being resumed: %s", "; ".join(changed))
        save_config(cfg, config_path)

    # Same initial weights on every rank; then per-rank random streams (drop path, masks) like the reference.
    _seed_everything(int(cfg.train.seed))
    parallel = Parallelism(str(cfg.compute.parallelism), precision, str(cfg.compute.param_dtype))
    mesh = None
    if parallel.sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
    meta_arch, optimizer = build_meta_arch(cfg, device, parallel, mesh)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
    _seed_everything(int(cfg.train.seed) + rank)

    start_iter = 0
    counters: Dict[str, Any] = {"skipped_batches": 0, "fp16_overflow_steps": 0, "skipped_files": 0,
                                "skipped_paths": []}
    meta: Dict[str, Any] = {}
    if latest is not None:
        latest, meta = ckpt.load_newest_loadable(run_dir, meta_arch, optimizer, scaler)
        start_iter = int(meta["iteration"])
        counters.update(meta.get("counters", {}))
        if meta.get("global_batch") not in (None, global_batch):
            log.warning("resuming with global batch %d but the checkpoint was trained with %s: the data order "
                        "and the lr scaling differ from the original run", global_batch, meta.get("global_batch"))
        log.info("resumed from %s at iteration %d", latest, start_iter)

    if is_main:
        n_backbone = _count_params(meta_arch.student["backbone"])
        n_heads = sum(_count_params(m) for name, m in meta_arch.student.items() if name != "backbone")
        log.info("world size %d (%s), device %s, precision %s, parallelism %s", world, dist_env.source, device,
                 precision, parallel.kind)
        log.info("global batch %d = %d per process x %d processes x %d accumulation steps; peak lr %.6g "
                 "(base %g, rule %s)", global_batch, per_gpu, world, k, schedules.peak_lr, cfg.optim.base_lr,
                 cfg.optim.scaling_rule)
        log.info("iterations %d -> %d; parameters: student backbone %s, heads %s", start_iter, total_iters,
                 f"{n_backbone:,}", f"{n_heads:,}")
        log.info("run directory %s", run_dir)

    loader_fn = data_loader_fn or _default_data_loader
    data_iter = iter(loader_fn(cfg, rank, world, start_iter * k))  # counts loader batches, not steps
    if meta:  # after creating the loader iterator, which draws its base seed from the global RNG
        ckpt.restore_rank_rng(meta, rank, world)
    # Unreadable files seen by this rank; the totals of earlier segments of the run are carried by rank 0.
    skipped = {"count": int(counters["skipped_files"]) if is_main else 0,
               "paths": set(counters["skipped_paths"]) if is_main else set()}
    metrics = MetricsLogger(run_dir, cfg, is_main, start_iter, total_iters)
    collapse = CollapseMonitor(int(cfg.dino.head_n_prototypes), int(cfg.logging.collapse_patience_iterations),
                               embed_dim=int(meta_arch.student["backbone"].embed_dim))
    autocast = _autocast_factory(device, precision)
    log_period, ckpt_period = int(cfg.logging.log_period_iterations), int(cfg.checkpoint.period_iterations)
    export_period = int(cfg.evaluation.eval_period_iterations)
    period_sums: Dict[str, float] = defaultdict(float)
    period_count, throughput = 0, Throughput()
    last_values: Dict[str, Any] = {}
    images_total, time_total = 0, 0.0

    def save(iteration: int) -> Path:
        total, paths = _all_ranks_skipped(skipped)
        counters.update(skipped_files=total, skipped_paths=sorted(paths))
        meta = {"config": _config_dict(cfg), "counters": dict(counters), "global_batch": global_batch,
                "batch_size_per_gpu": per_gpu, "grad_accum_steps": k,
                "samples_per_rank": iteration * per_gpu * k}
        return ckpt.save_checkpoint(run_dir, iteration, meta_arch, optimizer, meta, sharded=parallel.sharded,
                                    keep_last=int(cfg.checkpoint.keep_last), scaler=scaler)

    try:
        for it in range(start_iter, total_iters):
            t0 = time.perf_counter()
            micro_batches = _next_micro_batches(data_iter, k, skipped)
            t_data = time.perf_counter() - t0
            try:
                values = train_one_iteration(it, micro_batches, meta_arch, optimizer, scaler, schedules, parallel,
                                             autocast, float(cfg.optim.clip_grad), str(cfg.train.nonfinite))
            except NonFiniteLossError as error:  # name the checkpoint that stays the last good state
                last_good = ckpt.latest_checkpoint(run_dir)
                error = NonFiniteLossError(error.term, error.iteration, error.value, str(last_good or "") or None)
                log.error("%s", error)
                raise error from None
            if values["status"] == "skipped":
                counters["skipped_batches"] += 1
                log.warning("iteration %d: non-finite %s, update skipped (train.nonfinite=skip_batch; %d so far)",
                            it, values["nonfinite_term"], counters["skipped_batches"])
            elif values["status"] == "fp16_overflow":
                counters["fp16_overflow_steps"] += 1
            step_time = time.perf_counter() - t0
            n_images = _images_in(micro_batches) * world
            throughput.add(n_images, t_data, step_time)
            images_total, time_total = images_total + n_images, time_total + step_time
            done = it + 1

            numeric = {key: v for key, v in values.items() if isinstance(v, float)}
            if values["status"] == "ok":  # period averages over the updates that happened (schedules: last)
                for key, value in numeric.items():
                    if key not in SCHEDULE_KEYS:
                        period_sums[key] += value
                period_count += 1
            last_values = numeric
            warning = collapse.update(it, numeric.get("teacher_entropy"), numeric.get("student_cls_std"))
            if warning and is_main:
                log.warning("%s", warning)
            metrics.step(done, {"loss": numeric.get("total_loss", float("nan")), "lr": numeric["lr"]})

            if done % log_period == 0 or done == total_iters:
                record = {"iteration": done, **{key: numeric[key] for key in SCHEDULE_KEYS},
                          **{key: total / period_count for key, total in period_sums.items()},
                          **throughput.summary(), "peak_memory_mb": peak_memory_mb(device.type),
                          "skipped_batches": counters["skipped_batches"],
                          "fp16_overflow_steps": counters["fp16_overflow_steps"],
                          "skipped_files": _all_ranks_skipped(skipped, with_paths=False)[0]}
                if scaler.is_enabled():
                    record["grad_scale"] = float(scaler.get_scale())
                metrics.log(record)
                if is_main:
                    log.info("it %d/%d  total_loss %.4f  dino %.4f  ibot %.4f  koleo %.4f  lr %.3g  %.1f img/s",
                             done, total_iters, record.get("total_loss", float("nan")),
                             record.get("dino_loss", float("nan")), record.get("ibot_loss", float("nan")),
                             record.get("koleo_loss", float("nan")), record["lr"], record["images_per_s"])
                period_sums.clear()
                period_count = 0
                throughput.reset()
            if done % ckpt_period == 0 or done == total_iters:
                save(done)
            if done % export_period == 0 or done == total_iters:
                export_teacher_backbone(meta_arch, cfg, run_dir, done, is_main)
    finally:
        metrics.close()

    if start_iter >= total_iters:  # a finished run: report it as it was, rewrite nothing
        log.info("the run is complete (checkpoint at iteration %d of %d): nothing to train; raise optim.epochs or "
                 "train.max_iterations to extend it", start_iter, total_iters)
        previous = run_dir / "summary.json"
        if previous.exists():
            return json.loads(previous.read_text())
        export_teacher_backbone(meta_arch, cfg, run_dir, start_iter, is_main)  # it stopped before its summary
    total_skipped, all_paths = _all_ranks_skipped(skipped)
    summary = {
        "iterations": max(start_iter, total_iters),
        "start_iteration": start_iter,
        "world_size": world,
        "global_batch": global_batch,
        "peak_lr": schedules.peak_lr,
        "final_losses": {key: v for key, v in last_values.items() if key.endswith("loss")},
        "final_diagnostics": {key: v for key, v in last_values.items()
                              if not key.endswith("loss") and key not in SCHEDULE_KEYS},
        "images_per_s": images_total / time_total if time_total else None,
        "skipped_batches": counters["skipped_batches"],
        "fp16_overflow_steps": counters["fp16_overflow_steps"],
        "skipped_files": {"count": total_skipped, "paths": sorted(all_paths)},
        "checkpoint": str(ckpt.latest_checkpoint(run_dir)) if is_main else None,
        "export": str(run_dir / EXPORT_DIR / "teacher_backbone.pth"),
        "run_dir": str(run_dir),
    }
    if is_main:
        plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")
        log.info("done: %d iterations, %s images/s; summary in %s", summary["iterations"],
                 f"{summary['images_per_s']:.1f}" if summary["images_per_s"] else "n/a", run_dir / "summary.json")
    return summary


def _config_dict(cfg) -> Dict[str, Any]:
    from dinov2_repro.config import config_to_dict

    return config_to_dict(cfg)


def _all_ranks_skipped(skipped: Dict[str, Any], with_paths: bool = True):
    """(total count, union of paths) of the unreadable files of all ranks; collective under a process group."""
    import torch
    import torch.distributed as dist

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


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-repro train",
        description="DINOv2 pretraining. Single process: `dinov2-repro train --config X.yaml`; several GPUs: "
                    "`torchrun --nproc-per-node N -m dinov2_repro.train --config X.yaml compute.parallelism=fsdp`.",
    )
    parser.add_argument("--config", default=None, help="preset YAML (e.g. configs/train/demo_cpu.yaml or a run's "
                                                        "config.yaml); default: configs/ssl_default.yaml only")
    parser.add_argument("--output-dir", default=None, help="run directory (default: train.output_dir)")
    parser.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from <output-dir>/checkpoints/latest when present (default)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start from scratch; refuses a directory that already holds checkpoints")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit status (0 ok, 1 non-finite loss, 2 bad config/environment)."""
    from dinov2_repro.config import ConfigError, load_config
    from dinov2_repro.data.collate import UndecodableBatchError
    from dinov2_repro.distributed.env import DistEnvError

    from .checkpoint import CheckpointError
    from .guards import NonFiniteLossError

    args = build_parser().parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, output_dir=args.output_dir, resume=args.resume)
    except (ConfigError, DistEnvError, FileNotFoundError, CheckpointError) as error:
        print(f"dinov2-repro train: error: {error}", file=sys.stderr)
        return 2
    except UndecodableBatchError as error:  # from a loader worker the message carries its traceback: last line
        message = str(error).strip().splitlines()[-1].split("UndecodableBatchError: ", 1)[-1]
        print(f"dinov2-repro train: error: {message}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"dinov2-repro train: {error}", file=sys.stderr)
        return 1
    return 0
