"""The published DINOv2 training step, timed on one device, for a side-by-side with `train_step.py`.

Runs `SSLMetaArch.forward_backward` of the published code (facebookresearch/dinov2), then the rest of one
iteration of its `train.py` loop: schedule values written into the parameter groups, gradient clipping per
student module, AdamW, teacher EMA and the per-loss `.item()` of its logging. Crops are random tensors shaped by
the published collate and `MaskingGenerator`. Nothing is downloaded: point `--dinov2-src` at a checkout.

What differs from the published `train.py`, and why (each is printed and written to the JSON):
- No FSDP wrapper. One device shards nothing, and the published FSDP1 helpers (`x._handles`, `module.params`)
  are gone from torch >= 2.1. The teacher EMA is therefore the same two `_foreach` calls over the parameters,
  and clipping is `clip_grad_norm_` per student module (FSDP's on one rank computes the same norm).
- Precision: bf16 autocast, as `train_step.py` uses, instead of FSDP's fp16 parameter casting + grad scaler.
- `--attention plain` (or `auto` when xFormers cannot run here): the published layers without xFormers, i.e.
  their explicit softmax attention, with the student backbone run crop by crop (their list forward needs
  xFormers) and the heads' block-diagonal concatenation done with `torch.cat`/`split`. The JSON says which
  path was measured.

Examples:
    python benchmarks/published_step.py --dinov2-src .ref --arch vit_small --batch-size 128
    python benchmarks/published_step.py --dinov2-src .ref --device cpu --arch vit_small --batch-size 2 \
        --iters 2 --warmup 1 --attention plain --n-prototypes 1024 --precision fp32
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks.common import (environment_info, fmt_bytes, resolve_device, summarize_times, time_steps,
                               write_json)

ARCHES = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large"}
# One fixed point of the published schedules (mid warm-up); the values do not change the step's cost.
LR, WD, MOMENTUM, TEACHER_TEMP = 1e-4, 0.04, 0.994, 0.05


# ---------------------------------------------------------------------------------------------- import


class _BlockDiagonalStandIn:
    """What `fmha.BlockDiagonalMask` does for the published heads: concatenate along tokens, split back."""

    def __init__(self, sizes: List[int]):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[torch.Tensor]):
        return cls([t.shape[1] for t in tensors]), torch.cat(list(tensors), dim=1)

    def split(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        return list(tensor.split(self.sizes, dim=1))


def import_published(src: Path, use_xformers: bool):
    """The published `SSLMetaArch`, `collate_data_and_cast` and `MaskingGenerator` from a checkout at `src`."""
    if not (src / "dinov2" / "train" / "ssl_meta_arch.py").is_file():
        raise SystemExit(f"--dinov2-src {src}: no dinov2/train/ssl_meta_arch.py there (a checkout of "
                         "facebookresearch/dinov2 is needed; nothing is downloaded)")
    if not use_xformers:
        os.environ["XFORMERS_DISABLED"] = "1"  # the published layers then take their plain-attention path
        ops = types.ModuleType("xformers.ops")
        ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalStandIn)
        sys.modules.setdefault("xformers", types.ModuleType("xformers"))
        sys.modules["xformers.ops"] = ops
    sys.path.insert(0, str(src))
    # `dinov2.train`'s __init__ imports the whole training script (data sets, checkpointer); only the
    # meta-architecture is needed, so the package is registered without running it.
    package = types.ModuleType("dinov2.train")
    package.__path__ = [str(src / "dinov2" / "train")]
    sys.modules["dinov2.train"] = package
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    return SSLMetaArch, collate_data_and_cast, MaskingGenerator


# ---------------------------------------------------------------------------------------------- model


class PerCropBackbone(nn.Module):
    """The published backbone, called once per crop set when a list comes in (its list path needs xFormers)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.inner = backbone

    def forward(self, x, masks=None, is_training=False):
        if not isinstance(x, list):
            return self.inner(x, masks=masks, is_training=is_training)
        masks = masks if masks is not None else [None] * len(x)
        return [self.inner(xi, masks=mi, is_training=is_training) for xi, mi in zip(x, masks)]


def published_config(args: argparse.Namespace, src: Path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(src / "dinov2" / "configs" / "ssl_default_config.yaml")
    local_size = 96 if 96 % args.patch_size == 0 else 7 * args.patch_size
    overrides = [f"student.arch={ARCHES.get(args.arch, args.arch)}", f"student.patch_size={args.patch_size}",
                 f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={local_size}",
                 f"crops.local_crops_number={args.local_crops}", f"train.batch_size_per_gpu={args.batch_size}",
                 f"dino.head_n_prototypes={args.n_prototypes}", f"ibot.head_n_prototypes={args.n_prototypes}",
                 "compute_precision.grad_scaler=false"]
    if args.drop_path_rate is not None:
        overrides.append(f"student.drop_path_rate={args.drop_path_rate}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def build_model(SSLMetaArch, cfg, device: torch.device, per_crop: bool):
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    for key in model.student.keys():  # what prepare_for_distributed_training does before wrapping
        model.teacher[key].load_state_dict(model.student[key].state_dict())
    if per_crop:
        model.student["backbone"] = PerCropBackbone(model.student["backbone"])
    model.need_to_synchronize_fsdp_streams = False  # FSDP stream sharing; there is no FSDP here
    model.to(device)
    model.train()
    return model


def make_batch(cfg, collate, MaskingGenerator, device: torch.device, seed: int) -> Dict[str, Any]:
    """Random crops through the published collate and mask generator (their layout, their mask counts)."""
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g, l = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    side = g // cfg.student.patch_size
    masking = MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)
    samples = [({"global_crops": list(torch.randn(2, 3, g, g, generator=gen).unbind(0)),
                 "local_crops": list(torch.randn(cfg.crops.local_crops_number, 3, l, l, generator=gen).unbind(0))},
                None) for _ in range(cfg.train.batch_size_per_gpu)]
    batch = collate(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                    mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32, n_tokens=side * side,
                    mask_generator=masking)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- step


class PublishedStep:
    """One iteration of the published loop (see the module docstring for what differs)."""

    def __init__(self, model, cfg, device: torch.device, precision: str):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(model.get_params_groups(),
                                           betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
        self.student_params = [p for p in model.student.parameters()]
        self.teacher_params = [p for p in model.teacher.parameters()]
        assert len(self.student_params) == len(self.teacher_params)
        bf16 = precision == "bf16"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, float]:
        for group in self.optimizer.param_groups:  # the published apply_optim_scheduler
            group["weight_decay"] = WD * group["wd_multiplier"]
            group["lr"] = LR * group["lr_multiplier"]
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss_dict = self.model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
        for module in self.model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        with torch.no_grad():  # the published update_teacher, without the FSDP flat-parameter lookup
            torch._foreach_mul_(self.teacher_params, MOMENTUM)
            torch._foreach_add_(self.teacher_params, self.student_params, alpha=1 - MOMENTUM)
        return {k: v.item() for k, v in loss_dict.items()}  # the published loop's logging sync


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dinov2-src", required=True, help="folder holding the published dinov2/ package")
    p.add_argument("--arch", default="vit_small", help="vit_small | vit_base | vit_large (or vits14, ...)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--attention", default="auto", choices=("auto", "xformers", "plain"),
                   help="auto: xFormers when it runs here, else the published plain path (crop by crop)")
    p.add_argument("--n-prototypes", type=int, default=65536)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--drop-path-rate", type=float, default=None, help="default: the published config's 0.3")
    p.add_argument("--json-out", default="")
    return p.parse_args(argv)


def choose_attention(args: argparse.Namespace, device: torch.device) -> Dict[str, str]:
    if args.attention == "plain":
        return {"path": "plain", "why": "--attention plain"}
    from dinov2_repro.layers.attention import xformers_cuda_problem

    problem = xformers_cuda_problem() if device.type == "cuda" else "xFormers runs on CUDA only"
    if not problem:
        return {"path": "xformers", "why": "xFormers memory-efficient attention runs here"}
    if args.attention == "xformers":
        raise SystemExit(f"--attention xformers: xFormers cannot run here ({problem})")
    return {"path": "plain", "why": f"xFormers cannot run here ({problem})"}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = resolve_device(args.device)
    if device.type == "cpu":  # the published step moves its inputs with .cuda(); a CPU dry run keeps them
        torch.Tensor.cuda = lambda self, *a, **k: self
    attention = choose_attention(args, device)
    src = Path(args.dinov2_src)
    SSLMetaArch, collate, MaskingGenerator = import_published(src, attention["path"] == "xformers")
    cfg = published_config(args, src)
    result: Dict[str, Any] = {"benchmark": "published_step", "args": dict(vars(args)), "attention": attention,
                              "environment": environment_info(device),
                              "differences": ["no FSDP wrapper (one device); EMA and clipping without it",
                                              f"{args.precision} autocast instead of FSDP fp16 + grad scaler"]}
    if attention["path"] == "plain":
        result["differences"].append("plain attention, student backbone crop by crop, heads via torch.cat")
    print(f"published DINOv2 step | {result['environment']['device']} | torch {torch.__version__} | attention: "
          f"{attention['path']} ({attention['why']})")
    model = build_model(SSLMetaArch, cfg, device, per_crop=attention["path"] == "plain")
    step = PublishedStep(model, cfg, device, args.precision)
    batches = [make_batch(cfg, collate, MaskingGenerator, device, seed=i) for i in range(2)]
    counter = {"i": 0}

    def one_step():
        losses = step(batches[counter["i"] % 2])
        counter["i"] += 1
        return losses

    first_losses, first_s, times, memory = time_steps(one_step, args.warmup, args.iters, device)
    stats = summarize_times(times)
    images_per_s = args.batch_size / stats["mean_s"]
    result.update(batch_size=args.batch_size, first_iteration_s=first_s, first_losses=first_losses, times_s=times,
                  time_stats=stats, images_per_s=images_per_s, peak_memory_bytes=memory.peak_bytes,
                  peak_memory_note=memory.note,
                  student_params=sum(p.numel() for p in model.student.parameters()))
    print(f"first losses: { {k: round(v, 4) for k, v in first_losses.items()} }")
    print(f"step time: mean {stats['mean_s']:.4f} s/iter over {stats['n']} iters -> {images_per_s:.2f} images/s "
          f"at batch {args.batch_size}; peak memory {fmt_bytes(memory.peak_bytes)}")
    write_json(args.json_out, result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
