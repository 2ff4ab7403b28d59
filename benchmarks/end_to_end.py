"""End-to-end pretraining throughput: the real data loader feeding the real training step.

JPEG files are written to a temporary folder from the built-in synthetic brain-MRI generator (or read from
--data-dir), then the config's loader (`build_ssl_data_loader`: decode + CPU multi-crop in `--num-workers`
workers + iBOT mask collate) feeds the engine's `train_one_iteration` for --iters iterations. With --gpu-augment
the workers only decode and draw random numbers, and `dinov2_repro.data.batched_augment` makes the crops on
the device (same parameters as the CPU pipeline would use).

Per iteration it measures
  data wait   time the main process blocks in next(loader) (0 when the workers keep ahead),
  augment     device-side augmentation (--gpu-augment only; synchronised),
  step        the optimiser step (synchronised),
and reports whether the device waits for data (data wait > 5% of the iteration). Before that, the loader alone
is timed (its steady-state supply rate, after draining the batches prefetched during worker start-up, with the
step not competing for CPU cores; with --gpu-augment it includes the device-side augmentation).

Examples:
    python benchmarks/end_to_end.py --arch vit_small --batch-size 64 --num-workers 8
    python benchmarks/end_to_end.py --arch vit_small --batch-size 64 --num-workers 2 --gpu-augment
    python benchmarks/end_to_end.py --device cpu --batch-size 4 --num-workers 1 --iters 4 --precision fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `dinov2_repro` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import SKIMAGE_COLOUR_PHOTOS as PHOTOS
from benchmarks.common import environment_info, fmt_bytes, resolve_device, synchronize, write_json
from benchmarks.train_step import ARCH_ALIASES, TrainStep, apply_policies, build_meta_arch, local_crop_size_for

WAIT_THRESHOLD = 0.05  # the device "waits for data" when blocked in next(loader) for > 5% of an iteration


def write_jpeg_dataset(out_dir: Path, n_images: int, size: int, quality: int = 90, seed: int = 0) -> Dict[str, Any]:
    """`n_images` synthetic phantoms (classes in turn) as grayscale JPEGs in `out_dir`; returns timing."""
    from PIL import Image

    from dinov2_repro.data.synthetic import CLASSES, PhantomRenderer, render_phantom

    out_dir.mkdir(parents=True, exist_ok=True)
    renderer = PhantomRenderer(size)
    start = time.perf_counter()
    total_bytes = 0
    for i in range(n_images):
        label = CLASSES[i % len(CLASSES)]
        pixels = render_phantom(label, seed=seed, index=i // len(CLASSES), size=size, renderer=renderer)
        path = out_dir / f"{label}_{i:05d}.jpg"
        Image.fromarray(pixels, mode="L").save(path, format="JPEG", quality=quality)
        total_bytes += path.stat().st_size
    return {"n_images": n_images, "size": size, "quality": quality, "seconds": time.perf_counter() - start,
            "mean_file_bytes": total_bytes / max(1, n_images), "source": "phantoms (gray)"}


def write_photo_dataset(out_dir: Path, n_images: int, size: int, quality: int = 90, seed: int = 0) -> Dict[str, Any]:
    """`n_images` colour JPEGs cut from the real photographs shipped in scikit-image (random square crops of
    30-100% of the short side, flipped at random, resized to `size`): colour cost and real-image statistics,
    which the gray phantoms lack."""
    import numpy as np
    import skimage.data
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(skimage.data, name)()[..., :3]) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    total_bytes = 0
    for i in range(n_images):
        photo = photos[i % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.3, 1.0))
        x, y = (int(rng.integers(0, d - side + 1)) for d in photo.size)
        tile = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
        path = out_dir / f"{PHOTOS[i % len(PHOTOS)]}_{i:05d}.jpg"
        tile.save(path, format="JPEG", quality=quality)
        total_bytes += path.stat().st_size
    return {"n_images": n_images, "size": size, "quality": quality, "seconds": time.perf_counter() - start,
            "mean_file_bytes": total_bytes / max(1, n_images), "source": "photos (colour)"}


def build_config(args: argparse.Namespace, data_dir: Path):
    from dinov2_repro.config import load_config

    patch = args.patch_size
    overrides = [
        f"student.arch={ARCH_ALIASES.get(args.arch, args.arch)}",
        f"student.patch_size={patch}",
        f"crops.global_crops_size={args.global_size}",
        f"crops.local_crops_size={args.local_size or local_crop_size_for(patch)}",
        f"crops.local_crops_number={args.local_crops}",
        f"train.batch_size_per_gpu={args.batch_size}",
        f"train.seed={args.seed}",
        f"compute.precision={args.precision}",
        f"compute.compile={str(args.variant == 'compile').lower()}",
        "student.attn_backend=sdpa",
        f"data.path={data_dir}",
        "data.kind=folder",
        "data.split=''",  # every image below data.path (a preset may name a split folder)
        f"data.augmentation={args.augmentation}",
        f"data.augmentation_device={'cuda' if args.gpu_augment else 'cpu'}",
        f"compute.device={args.device if args.device in ('cpu', 'cuda') else 'auto'}",
        f"data.num_workers={args.num_workers}",
        f"data.persistent_workers={str(args.num_workers > 0).lower()}",
        f"data.pin_memory={str(args.device != 'cpu').lower()}",
    ]
    if args.n_prototypes:
        overrides += [f"dino.head_n_prototypes={args.n_prototypes}", f"ibot.head_n_prototypes={args.n_prototypes}"]
    if args.embed_dim or args.depth or args.num_heads:
        overrides += [f"student.embed_dim={args.embed_dim}", f"student.depth={args.depth}",
                      f"student.num_heads={args.num_heads}"]
    return load_config(args.config or None, overrides + list(args.overrides))


def build_loader(cfg, gpu_augment: bool, device: torch.device):
    """The config's SSL loader, or (gpu_augment) the decode-only loader and the device-side augmentation that
    ``data.augmentation_device=cuda`` uses in training (returned apart, so that the augmentation is timed apart)."""
    from dinov2_repro.data.loaders import build_device_augment_loader, build_ssl_data_loader

    if not gpu_augment:
        return build_ssl_data_loader(cfg), None
    wrapped = build_device_augment_loader(cfg)
    return wrapped.loader, wrapped.augment


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--embed-dim", type=int, default=0)
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--num-heads", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--variant", default="eager", choices=("eager", "compile"))
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--gpu-augment", action="store_true", help="decode on CPU, augment on the device")
    p.add_argument("--augmentation", default="dinov2", choices=("dinov2", "mri"))
    p.add_argument("--n-prototypes", type=int, default=65536)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=0)
    p.add_argument("--source", default="phantoms", choices=("phantoms", "photos"),
                   help="JPEGs to write: gray brain-MRI phantoms, or colour crops of scikit-image's photographs")
    p.add_argument("--n-images", type=int, default=512, help="synthetic JPEGs to write")
    p.add_argument("--image-size", type=int, default=256, help="side of the synthetic JPEGs")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--data-dir", default="", help="existing folder of images instead of synthetic JPEGs")
    p.add_argument("--config", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of the main process (0: default)")
    p.add_argument("--json-out", default="")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value (applied last)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.gpu_augment and device.type != "cuda":
        print("note: --gpu-augment on CPU runs the batched augmentation on the CPU main process (a functional "
              "check, not the intended use)")
    result: Dict[str, Any] = {"benchmark": "end_to_end", "args": dict(vars(args)),
                              "environment": environment_info(device)}
    with tempfile.TemporaryDirectory(prefix="dinov2_e2e_") as tmp:
        data_dir = Path(args.data_dir) if args.data_dir else Path(tmp) / "images"
        if not args.data_dir:
            writer = write_photo_dataset if args.source == "photos" else write_jpeg_dataset
            written = writer(data_dir, args.n_images, args.image_size, args.jpeg_quality, args.seed)
            result["dataset"] = written
            print(f"wrote {written['n_images']} {args.source} {written['size']}px JPEGs (quality {written['quality']}, "
                  f"{written['mean_file_bytes'] / 1024:.1f} KiB each) in {written['seconds']:.1f} s")
        cfg = build_config(args, data_dir)
        print(f"device: {result['environment']['device']} | torch {torch.__version__} | "
              f"loadavg {result['environment'].get('loadavg_1_5_15')}")
        print(f"arch {cfg.student.arch}/{cfg.student.patch_size}, batch {args.batch_size}, crops 2x"
              f"{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}, "
              f"augmentation {cfg.data.augmentation} on {'device' if args.gpu_augment else 'CPU workers'}, "
              f"workers {args.num_workers}, precision {args.precision}")

        # 1. the loader alone: how fast can it supply batches? The batches prefetched while the workers started
        # are drained untimed first, so the rate is the steady-state one.
        loader, augment = build_loader(cfg, args.gpu_augment, device)
        data_iter = iter(loader)
        prefetched = int(cfg.data.prefetch_factor) * args.num_workers
        n_timed = max(args.iters, 3)
        start = time.perf_counter()
        next(data_iter)  # worker start-up
        startup_s = time.perf_counter() - start
        for _ in range(prefetched):
            next(data_iter)
        start = time.perf_counter()
        for _ in range(n_timed):
            batch = next(data_iter)
            if augment is not None:  # the device-side part belongs to the supply too
                from dinov2_repro.data.batched_augment import augment_batch

                augment_batch(augment, batch)
                synchronize(device)
        loader_s = (time.perf_counter() - start) / n_timed
        del data_iter, loader
        result["loader_only"] = {"first_batch_s": startup_s, "drained_prefetched_batches": prefetched,
                                 "timed_batches": n_timed, "s_per_batch": loader_s,
                                 "images_per_s": args.batch_size / loader_s}
        print(f"loader alone{' + device augmentation' if augment is not None else ''}: first batch "
              f"{startup_s:.2f} s; after {prefetched} prefetched batches, {loader_s:.3f} s/batch = "
              f"{args.batch_size / loader_s:.1f} images/s over {n_timed} batches")

        # 2. loader + device augmentation + step
        meta = build_meta_arch(cfg, device)
        apply_policies(meta, cfg)
        step = TrainStep(meta, cfg, device, args.batch_size)
        loader, augment = build_loader(cfg, args.gpu_augment, device)
        data_iter = iter(loader)
        records: List[Dict[str, float]] = []
        peak_before = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        for it in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            batch = next(data_iter)
            t1 = t2 = time.perf_counter()
            if augment is not None:
                from dinov2_repro.data.batched_augment import augment_batch

                batch = augment_batch(augment, batch)
                synchronize(device)
                t2 = time.perf_counter()
            step(batch)
            synchronize(device)
            t3 = time.perf_counter()
            records.append({"data_wait_s": t1 - t0, "augment_s": t2 - t1, "step_s": t3 - t2, "iter_s": t3 - t0})
        del data_iter, loader  # stop the workers before the temporary images go (they would prefetch missing files)
        timed = records[args.warmup:]
        data_wait, aug_s, step_s, iter_s = (_mean([r[k] for r in timed]) for k in
                                            ("data_wait_s", "augment_s", "step_s", "iter_s"))
        wait_fraction = data_wait / iter_s if iter_s else 0.0
        result.update(
            iterations=records, warmup=args.warmup,
            mean_data_wait_s=data_wait, mean_augment_s=aug_s, mean_step_s=step_s, mean_iter_s=iter_s,
            data_wait_fraction=wait_fraction, device_waits_for_data=wait_fraction > WAIT_THRESHOLD,
            images_per_s=args.batch_size / iter_s if iter_s else None,
            step_only_images_per_s=args.batch_size / step_s if step_s else None,
        )
        if device.type == "cuda":
            result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
            result["peak_memory_before_bytes"] = peak_before
    print(f"per iteration (mean of {len(timed)} after {args.warmup} warm-up): data wait {data_wait:.3f} s, "
          + (f"device augment {aug_s:.3f} s, " if args.gpu_augment else "")
          + f"step {step_s:.3f} s, total {iter_s:.3f} s")
    print(f"end-to-end: {result['images_per_s']:.2f} images/s (step alone would allow "
          f"{result['step_only_images_per_s']:.2f} images/s)")
    verdict = "YES" if result["device_waits_for_data"] else "no"
    print(f"device waits for data: {verdict} ({100 * wait_fraction:.1f}% of each iteration blocked on the loader; "
          f"threshold {100 * WAIT_THRESHOLD:.0f}%)")
    if device.type == "cpu":
        print("note: on CPU the loader workers and the step share the same cores, so neither figure is what a "
              "GPU machine would see")
    if "peak_memory_bytes" in result:
        print(f"peak device memory: {fmt_bytes(result['peak_memory_bytes'])}")
    result["environment_after"] = environment_info(device)
    write_json(args.json_out, result)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
