"""Multi-crop augmentation throughput: our tensor pipeline vs a plain torchvision PIL pipeline of the same recipe.

Writes N synthetic phantom JPEGs (512x512, gray stored as RGB like the Kaggle scans) to a temporary folder, then
measures images/s (decode + 2 global + n local crops) in one process (num_workers=0, one thread: the cost per
loader worker) and with a DataLoader using every core (num_workers = os.cpu_count()), including the collate.

  python benchmarks/augmentation.py --n-images 64 --seconds 10 --patch-size 14 --json-out aug.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def write_jpegs(folder: Path, n: int, size: int = 512) -> None:
    import numpy as np
    from PIL import Image

    from dinov2_repro.data.synthetic import CLASSES, PhantomRenderer, phantom_rng

    renderer = PhantomRenderer(size)
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        gray = renderer.render(label, phantom_rng(0, 0, CLASSES.index(label), i))
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / f"{i:05d}.jpg", quality=90)


class PILMultiCrop:
    """The same recipe with torchvision's PIL transforms (v1 API), as most DINO codebases do it."""

    def __init__(self, global_size: int, local_size: int, local_number: int):
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC

        def view(size, scale, blur_p, solarize_p):
            ops = [T.RandomResizedCrop(size, scale=scale, interpolation=bicubic), T.RandomHorizontalFlip(0.5),
                   T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2)]
            if blur_p > 0:
                ops.append(T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p))
            if solarize_p > 0:
                ops.append(T.RandomSolarize(128, p=solarize_p))
            ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
            return T.Compose(ops)

        self.global_1 = view(global_size, (0.32, 1.0), 1.0, 0.0)
        self.global_2 = view(global_size, (0.32, 1.0), 0.1, 0.2)
        self.local = view(local_size, (0.05, 0.32), 0.5, 0.0)
        self.local_number = local_number

    def __call__(self, image):
        return {"global_crops": [self.global_1(image), self.global_2(image)],
                "local_crops": [self.local(image) for _ in range(self.local_number)]}


class PILDataset:
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), -1


def stack_crops(samples):
    import torch

    n_global, n_local = len(samples[0][0]["global_crops"]), len(samples[0][0]["local_crops"])
    return (torch.stack([s[0]["global_crops"][i] for i in range(n_global) for s in samples]),
            torch.stack([s[0]["local_crops"][i] for i in range(n_local) for s in samples]) if n_local else None)


def rate_in_process(dataset, keys, seconds: float) -> float:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # what one DataLoader worker gets
    try:
        dataset[keys[0]]  # warm-up (lazy imports, allocator)
        count, start = 0, time.perf_counter()
        for key in itertools.cycle(keys):
            dataset[key]
            count += 1
            if time.perf_counter() - start >= seconds:
                break
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


def rate_with_loader(dataset, sampler, collate, workers: int, batch_size: int, seconds: float) -> float:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=workers, persistent_workers=False, prefetch_factor=4)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        count += batch_size
    elapsed = time.perf_counter() - start
    del iterator
    return count / elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per configuration")
    parser.add_argument("--patch-size", type=int, default=14, choices=(14, 16))
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--preset", default="dinov2", choices=("dinov2", "mri"), help="our pipeline's preset")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader workers for the all-core run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import torch

    from dinov2_repro.data.augmentations import MultiCropAugmentation
    from dinov2_repro.data.collate import SSLCollate
    from dinov2_repro.data.datasets import UnlabeledFolderDataset
    from dinov2_repro.data.loaders import MultiCropDataset
    from dinov2_repro.data.masking import MaskingGenerator
    from dinov2_repro.data.samplers import InfiniteShardedSampler

    local_size = 98 if args.patch_size == 14 else 96
    results = {"config": dict(vars(args), local_size=local_size, cpu_count=os.cpu_count(),
                              torch=torch.__version__, machine=platform.processor() or platform.machine()),
               "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_jpegs(folder, args.n_images)
        images = UnlabeledFolderDataset(folder)
        ours = MultiCropDataset(images, MultiCropAugmentation(
            local_crops_number=args.local_number, global_crops_size=args.global_size, local_crops_size=local_size,
            patch_size=args.patch_size, preset=args.preset), seed=0)
        side = args.global_size // args.patch_size
        collate = SSLCollate(MaskingGenerator((side, side)), local_crops_size=local_size)
        baseline = PILDataset([p for p, _ in images.samples],
                              PILMultiCrop(args.global_size, local_size, args.local_number))
        runs = [
            (f"ours (tensor v2, preset {args.preset}, + masks)", ours,
             [(i, i) for i in range(len(ours))],
             lambda: InfiniteShardedSampler(len(ours), seed=0, with_positions=True), collate),
            ("torchvision PIL transforms", baseline, list(range(len(baseline))),
             lambda: InfiniteShardedSampler(len(baseline), seed=0), stack_crops),
        ]
        for name, dataset, keys, make_sampler, collate_fn in runs:
            one = rate_in_process(dataset, keys, args.seconds)
            many = rate_with_loader(dataset, make_sampler(), collate_fn, args.workers, args.batch_size, args.seconds)
            results["rows"].append({"pipeline": name, "images_per_s_one_process": one,
                                    f"images_per_s_{args.workers}_workers": many})
    crops = f"2x{args.global_size} + {args.local_number}x{local_size}"
    print(f"multi-crop throughput ({crops}, 512px JPEG input, {args.n_images} images, {args.seconds:.0f} s each)")
    print(f"{'pipeline':<48} {'img/s, 1 process':>17} {f'img/s, {args.workers} workers':>20}")
    for row in results["rows"]:
        print(f"{row['pipeline']:<48} {row['images_per_s_one_process']:>17.1f} "
              f"{row[f'images_per_s_{args.workers}_workers']:>20.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
