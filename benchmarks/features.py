"""Feature-extraction throughput (images/s) of a frozen backbone on synthetic images; prints one JSON object.

    python benchmarks/features.py --backbone random:vit_small/14 --device cuda --batch-size 128
    python benchmarks/features.py --backbone runs/vits14 --device cpu --batch-size 32 --img-size 224

Measures what the linear probe and k-NN spend on each image: `get_intermediate_layers` of the last
``--n-last-blocks`` blocks (with the mean patch token), under bf16 autocast on CUDA (as in `dinov2_repro.eval`).
Images are random tensors already on the device, so decoding and transfer are excluded: this is the model's rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random:vit_small/14", help="a SPEC (see dinov2-repro eval --help)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=0, help="0 = the backbone's evaluation size")
    parser.add_argument("--n-last-blocks", type=int, default=4)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=10, help="timed batches")
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch default)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    from dinov2_repro.eval.backbone_spec import environment_device, load_backbone
    from dinov2_repro.eval.features import autocast_context, backbone_outputs, effective_precision

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(environment_device(args.device))
    model, info = load_backbone(args.backbone, device)
    size = args.img_size or int(info["eval_img_size"])
    images = torch.randn(args.batch_size, 3, size, size, device=device)

    def run_batch():
        with autocast_context(device, args.precision):
            backbone_outputs(model, images, args.n_last_blocks)

    for _ in range(args.warmup):
        run_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.batches):
        run_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = dict(
        backbone=args.backbone, embed_dim=info.get("embed_dim"), depth=info.get("depth"),
        patch_size=info.get("patch_size"), n_params=info.get("n_params"), img_size=size,
        batch_size=args.batch_size, n_last_blocks=args.n_last_blocks, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        precision=effective_precision(device, args.precision), threads=torch.get_num_threads(),
        batches=args.batches, seconds=seconds, images_per_s=args.batch_size * args.batches / seconds,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        torch=torch.__version__)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
