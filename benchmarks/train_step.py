"""Pretraining step throughput, peak memory and MFU on one device (data loading excluded).

What is timed: one real optimiser step, the engine's own `train_one_iteration` on an `SSLMetaArch` built from
`load_config` (defaults <- optional --config preset <- the flags below <- extra key=value overrides):
    schedules -> training_step (teacher + student + DINO/iBOT/KoLeo, under autocast for bf16) -> backward
    -> per-module grad clipping -> metrics all-reduce/host sync -> AdamW step -> teacher EMA update
on synthetic tensors already on the device, shaped like the SSL collate output (2 global crops and
`--local-crops` local crops per image, iBOT masks drawn by the real mask generator).

FLOPs: fvcore's FlopCountAnalysis on the forward parts of the real step (the meta-architecture's
`teacher_step` = teacher backbone on the global crops + head, and `student_step` = student backbone on masked
global + local crops + head), with a handle added for SDPA attention. fvcore counts one multiply-add as one
"flop" (MAC); step MACs = teacher_fwd + 3 x student_fwd (backward ~ 2 x forward), hardware FLOPs = 2 x MACs.
MFU = hardware FLOPs per second / a dense matmul peak measured in this script (bf16 8192^3 on CUDA; fp32 on CPU,
labelled as such).

Examples:
    python benchmarks/train_step.py --arch vit_small --batch-size 64 --precision bf16
    python benchmarks/train_step.py --arch vit_large --variant compile --activation-checkpointing --find-max-batch
    python benchmarks/train_step.py --device cpu --arch vit_small --batch-size 4 --precision fp32 --iters 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `dinov2_repro` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.common import (count_macs_fvcore, count_macs_torch, environment_info, fmt_bytes, fmt_si, is_oom,
                               measure_matmul_peak, resolve_device, summarize_times, synchronize, time_steps,
                               write_json)

ARCH_ALIASES = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2",
                "vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large", "vit_g": "vit_giant2"}
VARIANTS = ("eager", "compile", "xformers")
FWD_BWD_FACTOR = 3  # forward + backward ~ 3 x forward (backward computes grads w.r.t. inputs and weights)


# ---------------------------------------------------------------------------------------------- config


def local_crop_size_for(patch_size: int) -> int:
    """The recipe's local crop side: 96 for patch 16, 98 for patch 14 (7 patches when 96 is not a multiple)."""
    return 96 if 96 % patch_size == 0 else 7 * patch_size


def build_config(args: argparse.Namespace):
    """The run's config: defaults <- --config preset <- flags <- extra key=value overrides (last wins)."""
    from dinov2_repro.config import load_config

    patch = args.patch_size
    overrides = [
        f"student.arch={ARCH_ALIASES.get(args.arch, args.arch)}",
        f"student.patch_size={patch}",
        f"crops.global_crops_size={args.global_size}",
        f"crops.local_crops_size={args.local_size or local_crop_size_for(patch)}",
        f"crops.local_crops_number={args.local_crops}",
        f"train.batch_size_per_gpu={args.batch_size}",
        f"compute.precision={args.precision}",
        f"compute.device={args.device if args.device in ('cpu', 'cuda') else 'auto'}",
        f"compute.compile={str(args.variant == 'compile').lower()}",
        f"compute.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"student.attn_backend={'xformers' if args.variant == 'xformers' else 'sdpa'}",
    ]
    if args.n_prototypes:
        overrides += [f"dino.head_n_prototypes={args.n_prototypes}", f"ibot.head_n_prototypes={args.n_prototypes}"]
    if args.embed_dim or args.depth or args.num_heads:
        overrides += [f"student.embed_dim={args.embed_dim}", f"student.depth={args.depth}",
                      f"student.num_heads={args.num_heads}"]
    if args.drop_path_rate is not None:
        overrides.append(f"student.drop_path_rate={args.drop_path_rate}")
    return load_config(args.config or None, overrides + list(args.overrides))


# ---------------------------------------------------------------------------------------------- batch


def make_synthetic_batch(cfg, batch_size: int, device: torch.device, seed: int = 0) -> Dict[str, Any]:
    """Random crops on `device` in the SSL collate's layout, with iBOT masks from the real mask generator.

    The samples go through the data package's own collate (`collate_data_and_cast` with `build_mask_generator`),
    so the mask count, the mask weights and the crop-major layout are those of a real batch:
    collated_global_crops (2B, 3, G, G), collated_local_crops (n_local * B, 3, L, L), collated_masks (2B, N), ...
    """
    import numpy as np

    from dinov2_repro.data.collate import collate_data_and_cast
    from dinov2_repro.data.loaders import build_mask_generator

    gen = torch.Generator().manual_seed(seed)
    g, l, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [{"global_crops": list(torch.randn(2, 3, g, g, generator=gen).unbind(0)),
                "local_crops": list(torch.randn(n_local, 3, l, l, generator=gen).unbind(0))}
               for _ in range(batch_size)]
    batch = collate_data_and_cast(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                                  mask_probability=float(cfg.ibot.mask_sample_probability),
                                  mask_generator=build_mask_generator(cfg), rng=np.random.default_rng(seed),
                                  local_crops_size=l)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- step


class TrainStep:
    """One optimiser step exactly as the engine runs it (`step.train_one_iteration`: schedules, autocast
    training_step, backward, per-module clipping, AdamW, teacher EMA, and the per-iteration metric sync)."""

    def __init__(self, meta, cfg, device: torch.device, batch_size: int):
        from dinov2_repro.distributed.parallelize import Parallelism
        from dinov2_repro.train.param_groups import build_optimizer
        from dinov2_repro.train.schedules import Schedules

        precision = str(cfg.compute.precision)
        if precision == "fp16":
            raise SystemExit("compute.precision=fp16 is not benchmarked here (use bf16 or fp32)")
        self.meta, self.cfg, self.device = meta, cfg, device
        # Same order as loop.build_meta_arch: policies were applied by the caller, then parallelism, optimiser.
        self.parallel = Parallelism("none", precision, str(cfg.compute.param_dtype))
        self.parallel.prepare(meta)
        self.optimizer = build_optimizer(meta.get_params_groups(), cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        self.schedules = Schedules.from_config(cfg, global_batch=batch_size)
        if precision == "bf16":
            self.autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        self.iteration = 0

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        from dinov2_repro.train.step import StepContext, train_one_iteration

        ctx = StepContext(self.meta, self.optimizer, self.scaler, self.schedules, self.parallel, self.autocast,
                          float(self.cfg.optim.clip_grad), "stop")
        values = train_one_iteration(self.iteration, [batch], ctx)
        self.iteration += 1
        return values


# ---------------------------------------------------------------------------------------------- FLOPs


class _TeacherForward(nn.Module):
    def __init__(self, meta, teacher_temp: float):
        super().__init__()
        self.meta, self.teacher_temp = meta, teacher_temp

    def forward(self, global_crops, mask_indices):
        out = self.meta.teacher_step(global_crops, mask_indices, self.teacher_temp)
        return tuple(v for v in out.values() if torch.is_tensor(v))


class _StudentForward(nn.Module):
    def __init__(self, meta):
        super().__init__()
        self.meta = meta

    def forward(self, global_crops, local_crops, masks, mask_indices):
        out = self.meta.student_step(global_crops, local_crops, masks, mask_indices)
        return tuple(v for v in out.values() if torch.is_tensor(v))


def count_step_macs(meta, batch: Dict[str, Any], teacher_temp: float, counter: str = "fvcore") -> Dict[str, Any]:
    """MACs of the teacher forward and the student forward of `batch` (the real step's code), and the step total
    = teacher + FWD_BWD_FACTOR x student. Loss-centre buffers are restored, so counting leaves no trace."""
    inputs_t = (batch["collated_global_crops"], batch["mask_indices_list"])
    inputs_s = (batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"],
                batch["mask_indices_list"])
    loss_states = {name: copy.deepcopy(getattr(meta, name).state_dict()) for name in ("dino_loss", "ibot_patch_loss")}
    teacher, student = _TeacherForward(meta, teacher_temp), _StudentForward(meta)
    try:
        with torch.no_grad():
            if counter == "fvcore":
                t = count_macs_fvcore(teacher, inputs_t)
                s = count_macs_fvcore(student, inputs_s)
            else:
                t = count_macs_torch(lambda: teacher(*inputs_t))
                s = count_macs_torch(lambda: student(*inputs_s))
    finally:
        for name, state in loss_states.items():
            module = getattr(meta, name)
            module.apply_center_update()
            module.load_state_dict(state)
    step = t["macs"] + FWD_BWD_FACTOR * s["macs"]
    return {"counter": t["counter"], "teacher_fwd_macs": t["macs"], "student_fwd_macs": s["macs"],
            "step_macs": step, "step_hw_flops": 2 * step, "fwd_bwd_factor": FWD_BWD_FACTOR,
            "teacher_by_operator": t["by_operator"], "student_by_operator": s["by_operator"],
            "uncounted_ops": sorted(set(t["uncounted_ops"]) | set(s["uncounted_ops"]))}


# ---------------------------------------------------------------------------------------------- main parts


def build_meta_arch(cfg, device: torch.device):
    from dinov2_repro.train.meta_arch import SSLMetaArch

    torch.manual_seed(int(cfg.train.seed))
    meta = SSLMetaArch(cfg).to(device)
    meta.train()
    return meta


def apply_policies(meta, cfg) -> None:
    from dinov2_repro.distributed.compile import apply_compute_policies

    apply_compute_policies(meta, compile=bool(cfg.compute.compile),
                           activation_checkpointing=bool(cfg.compute.activation_checkpointing))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fits(step: TrainStep, cfg, batch_size: int, device: torch.device) -> bool:
    """Two steps at `batch_size` with two batches resident, as in the timed loop, without running out of
    device memory (one step alone can fit where the steady state does not: seen on an H200)."""
    batches = None
    try:
        batches = [make_synthetic_batch(cfg, batch_size, device, seed=batch_size + i) for i in range(2)]
        for batch in batches:
            step(batch)
        synchronize(device)
        return True
    except Exception as exc:  # noqa: BLE001 - only OOM is expected, everything else is re-raised
        if not is_oom(exc):
            raise
        return False
    finally:
        del batches
        step.optimizer.zero_grad(set_to_none=True)
        _release(device)


def find_max_batch(step: TrainStep, cfg, start: int, device: torch.device, limit: int = 1 << 16) -> Dict[str, Any]:
    """Largest per-device batch that fits: double from `start` until out of memory, then bisect."""
    tried: List[List[Any]] = []
    good, bad = 0, None
    size = max(1, start)
    while size <= limit:
        ok = fits(step, cfg, size, device)
        tried.append([size, ok])
        print(f"  find-max-batch: batch {size}: {'fits' if ok else 'out of memory'}", flush=True)
        if not ok:
            bad = size
            break
        good, size = size, size * 2
    if bad is not None:
        if good == 0:  # even `start` failed: bisect down from it
            low, high = 0, bad
        else:
            low, high = good, bad
        while high - low > 1:
            mid = (low + high) // 2
            ok = fits(step, cfg, mid, device)
            tried.append([mid, ok])
            print(f"  find-max-batch: batch {mid}: {'fits' if ok else 'out of memory'}", flush=True)
            low, high = (mid, high) if ok else (low, mid)
        good = low
    return {"max_batch_size": good, "tried": tried, "limit_reached": bad is None}


def profile_top(one_step, device: torch.device, n: int, steps: int = 2) -> List[Dict[str, Any]]:
    """The `n` kernels (CUDA) or operators (CPU) with the most self time over `steps` steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1.0
    top = [{"name": e.key[:120], "ms_per_step": getattr(e, attr) / 1e3 / steps, "share": getattr(e, attr) / total,
            "calls_per_step": e.count / steps} for e in events[:n]]
    print(f"top {n} by self {'device' if device.type == 'cuda' else 'CPU'} time:")
    for row in top:
        print(f"  {100 * row['share']:5.1f}%  {row['ms_per_step']:8.2f} ms/step  {row['name']}")
    return top


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", default="vit_small",
                   help="vit_small | vit_base | vit_large | vit_giant2 (aliases vits14, vitb14, vitl14, vitg14)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--embed-dim", type=int, default=0, help="custom width (with --depth, --num-heads); 0 = arch's")
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--num-heads", type=int, default=0)
    p.add_argument("--drop-path-rate", type=float, default=None, help="default: the config's value")
    p.add_argument("--batch-size", type=int, default=32, help="images per device (each gives 2 global + local crops)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--variant", default="eager", choices=VARIANTS,
                   help="eager (PyTorch SDPA), compile (per-block torch.compile), xformers (attention kernel)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--n-prototypes", type=int, default=65536, help="DINO/iBOT head prototypes (0: config's)")
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=0, help="0: 96 for patch 16, 98 for patch 14")
    p.add_argument("--config", default="", help="optional preset YAML applied before the flags")
    p.add_argument("--find-max-batch", action="store_true",
                   help="CUDA only: double the batch until out of memory, bisect, then benchmark the largest")
    p.add_argument("--flop-counter", default="fvcore", choices=("fvcore", "torch", "none"))
    p.add_argument("--peak-size", type=int, default=0, help="matmul side for the peak measurement (0: default)")
    p.add_argument("--profile-top", type=int, default=0,
                   help="after timing, profile 2 steps and record the N kernels/operators that take the most time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json-out", default="")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value (applied last)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Benchmark as described in the module docstring; prints a report and returns it as a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    result: Dict[str, Any] = {"benchmark": "train_step", "args": {k: v for k, v in vars(args).items()},
                              "environment": environment_info(device)}
    if args.variant == "xformers":
        from dinov2_repro.layers.attention import xformers_cuda_problem, xformers_import_problem

        problem = xformers_import_problem() or (device.type == "cuda" and xformers_cuda_problem())
        if problem:
            print(f"skipped: {problem}")
            result["skipped"] = problem
            write_json(args.json_out, result)
            return result
        if device.type != "cuda":
            print("skipped: xformers attention runs on CUDA only (the CPU path would silently be SDPA)")
            result["skipped"] = "xformers needs CUDA"
            write_json(args.json_out, result)
            return result
    if args.find_max_batch and device.type != "cuda":
        raise SystemExit("--find-max-batch needs CUDA: on CPU an oversized batch swaps or gets killed instead of "
                         "raising an out-of-memory error")

    cfg = build_config(args)
    result["config"] = {"arch": cfg.student.arch, "patch_size": cfg.student.patch_size,
                        "embed_dim": cfg.student.embed_dim, "depth": cfg.student.depth,
                        "drop_path_rate": cfg.student.drop_path_rate, "n_prototypes": cfg.dino.head_n_prototypes,
                        "ibot_separate_head": cfg.ibot.separate_head, "centering": cfg.train.centering,
                        "global_crops_size": cfg.crops.global_crops_size,
                        "local_crops_size": cfg.crops.local_crops_size,
                        "local_crops_number": cfg.crops.local_crops_number, "precision": cfg.compute.precision,
                        "compile": cfg.compute.compile,
                        "activation_checkpointing": cfg.compute.activation_checkpointing}
    print(f"device: {result['environment']['device']} | torch {torch.__version__} | "
          f"loadavg {result['environment'].get('loadavg_1_5_15')}")
    print(f"config: {result['config']}")

    meta = build_meta_arch(cfg, device)
    n_params = sum(p.numel() for p in meta.student.parameters())
    result["student_params"] = n_params
    print(f"student parameters: {n_params / 1e6:.2f} M (backbone "
          f"{sum(p.numel() for p in meta.student['backbone'].parameters()) / 1e6:.2f} M)")

    batch_size = args.batch_size
    batches = [make_synthetic_batch(cfg, batch_size, device, seed=args.seed + i) for i in range(2)]
    n_masked = [int(b["mask_indices_list"].numel()) for b in batches]
    print(f"batch: {batch_size} images -> global {tuple(batches[0]['collated_global_crops'].shape)}, "
          f"local {tuple(batches[0]['collated_local_crops'].shape)}, masked patch tokens per batch {n_masked}")

    # FLOPs of the plain modules (before compile wrappers, which jit tracing cannot see through).
    flops = None
    if args.flop_counter != "none":
        start = time.perf_counter()
        flops = count_step_macs(meta, batches[0], float(cfg.teacher.teacher_temp), args.flop_counter)
        flops["per_image_step_macs"] = flops["step_macs"] / batch_size
        flops["count_seconds"] = time.perf_counter() - start
        result["flops"] = flops
        print(f"FLOPs ({flops['counter']}, 1 MAC = 1 fused multiply-add; hardware FLOPs = 2 x MACs): "
              f"teacher fwd {fmt_si(flops['teacher_fwd_macs'], 'MAC')}, student fwd "
              f"{fmt_si(flops['student_fwd_macs'], 'MAC')}, step = teacher + {FWD_BWD_FACTOR} x student = "
              f"{fmt_si(flops['step_macs'], 'MAC')} = {fmt_si(flops['step_hw_flops'], 'FLOP')} "
              f"({fmt_si(2 * flops['per_image_step_macs'], 'FLOP')} per image)")
        print(f"  uncounted ops (elementwise etc.): {', '.join(flops['uncounted_ops']) or 'none'}")

    apply_policies(meta, cfg)
    step = TrainStep(meta, cfg, device, batch_size)

    if args.find_max_batch:
        del batches
        _release(device)
        search = find_max_batch(step, cfg, batch_size, device)
        result["find_max_batch"] = search
        print(f"max batch per device: {search['max_batch_size']}"
              + (" (search limit reached)" if search["limit_reached"] else ""))
        if search["max_batch_size"] < 1:
            write_json(args.json_out, result)
            return result
        batch_size = search["max_batch_size"]
        batches = [make_synthetic_batch(cfg, batch_size, device, seed=args.seed + i) for i in range(2)]
        step.schedules = type(step.schedules).from_config(cfg, global_batch=batch_size)
        if flops is not None:  # the per-image cost hardly depends on the batch; rescale the counted total
            flops["step_macs_at_counted_batch"] = flops["step_macs"]
            flops["step_macs"] = flops["per_image_step_macs"] * batch_size
            flops["step_hw_flops"] = 2 * flops["step_macs"]

    counter = {"i": 0}

    def one_step():
        step(batches[counter["i"] % len(batches)])
        counter["i"] += 1

    # First iteration separately: it includes compilation / autotuning / optimiser-state allocation.
    # CPU peak memory: from before the first step (optimiser state included)
    _, first_s, times, memory = time_steps(one_step, args.warmup, args.iters, device)
    stats = summarize_times(times)
    images_per_s = batch_size / stats["mean_s"]
    result.update(batch_size=batch_size, first_iteration_s=first_s, times_s=times, time_stats=stats,
                  images_per_s=images_per_s, crops_per_s=images_per_s * (2 + cfg.crops.local_crops_number),
                  peak_memory_bytes=memory.peak_bytes, peak_memory_kind=memory.kind, peak_memory_note=memory.note)

    if args.profile_top:
        result["profile_top"] = profile_top(one_step, device, args.profile_top)
    peak = measure_matmul_peak(device, size=args.peak_size or None)
    result["matmul_peak"] = peak
    print(f"first iteration (incl. compile/allocation): {first_s:.3f} s")
    print(f"step time: mean {stats['mean_s']:.4f} s/iter, median {stats['median_s']:.4f}, min {stats['min_s']:.4f}, "
          f"std {stats['std_s']:.4f} over {stats['n']} iters")
    print(f"throughput: {images_per_s:.2f} images/s ({result['crops_per_s']:.1f} crops/s) at batch {batch_size}")
    print(f"peak memory: {fmt_bytes(memory.peak_bytes)} [{memory.note}]")
    print(f"matmul peak: {fmt_si(peak['flops_per_s'], 'FLOP/s')} ({peak['label']})")
    if flops is not None:
        achieved = flops["step_hw_flops"] / stats["mean_s"]
        result["achieved_flops_per_s"] = achieved
        result["mfu"] = achieved / peak["flops_per_s"]
        print(f"achieved: {fmt_si(achieved, 'FLOP/s')} -> MFU {100 * result['mfu']:.1f}% of the measured "
              f"{peak['dtype']} matmul peak")
    result["environment_after"] = environment_info(device)
    write_json(args.json_out, result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
