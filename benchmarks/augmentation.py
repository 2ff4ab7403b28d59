"""Multi-crop augmentation images/s per loader worker: ours against a copy of the published DINOv2 composition.

The published composition (facebookresearch/dinov2, ``dinov2/data/augmentations.py`` ``DataAugmentationDINO`` and
``transforms.py`` ``GaussianBlur``) is written out below with torchvision's PIL transforms: RandomResizedCrop
(bicubic) + RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(0.2),
its GaussianBlur(9, sigma 0.1-2) with p=1.0 / 0.1 / 0.5 for global 1 / global 2 / locals, RandomSolarize(128, p=0.2)
on global 2, ToTensor + Normalize. Its GaussianBlur hands ``1 - p`` to RandomApply, so the blur actually runs with
probability 0 / 0.9 / 0.5; ours does the same with ``blur_mode="as_released"`` (the same output distribution) and
1.0 / 0.1 / 0.5 with the default ``"paper"``; both are measured.

Inputs, reported separately:
- colour: 512 x 512 crops of scikit-image's colour photographs (astronaut, coffee, chelsea, rocket,
  immunohistochemistry, retina, hubble_deep_field; smaller ones upscaled first), JPEG quality 90;
- gray: the synthetic brain-MRI phantoms (512 px, gray stored as RGB like the Kaggle scans), JPEG quality 90.

Modes: ``decoded`` (images decoded once beforehand: PIL RGB for the published code, uint8 tensors for ours;
augmentation only) and ``jpeg`` (decode included: ``Image.open(...).convert("RGB")`` as the published
ImageDataDecoder, `decode_image_file` for ours). One torch thread, one process: the cost per DataLoader worker.
Pipelines are measured interleaved in short slices over several rounds, so that load on a shared machine hits
them alike; the ratio ours/published is the one to read, with the load average printed beside it.

  python benchmarks/augmentation.py --n-images 32 --seconds 20 --json-out aug.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this checkout's dinov2_repro, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def colour_images(n: int, size: int = 512):
    """``n`` uint8 (size, size, 3) crops of scikit-image's colour photographs, cycling over the sources."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from benchmarks.common import SKIMAGE_COLOUR_PHOTOS

    sources = []
    for name in SKIMAGE_COLOUR_PHOTOS:
        image = Image.fromarray(getattr(data, name)()[..., :3])
        short = min(image.size)
        if short < size:  # chelsea, coffee, rocket: upscale so that a full crop fits
            image = image.resize((round(image.width * size / short), round(image.height * size / short)),
                                 Image.BICUBIC)
        sources.append(np.asarray(image))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        source = sources[i % len(sources)]
        top = int(rng.integers(0, source.shape[0] - size + 1))
        left = int(rng.integers(0, source.shape[1] - size + 1))
        out.append(np.ascontiguousarray(source[top:top + size, left:left + size]))
    return out


def gray_images(n: int, size: int = 512):
    """``n`` synthetic brain-MRI phantoms, gray stored as uint8 (size, size, 3)."""
    import numpy as np

    from dinov2_repro.data.synthetic import CLASSES, PhantomRenderer, phantom_rng

    renderer = PhantomRenderer(size)
    return [np.stack([renderer.render(CLASSES[i % len(CLASSES)],
                                      phantom_rng(0, 0, i % len(CLASSES), i))] * 3, axis=-1) for i in range(n)]


class PublishedDINOv2Augmentation:
    """``DataAugmentationDINO`` of facebookresearch/dinov2, written out with the same torchvision PIL transforms."""

    def __init__(self, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=8,
                 global_crops_size=224, local_crops_size=98):
        from torchvision import transforms as T

        def gaussian_blur(p):  # dinov2/data/transforms.py GaussianBlur: RandomApply with keep_p = 1 - p
            return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1 - p)

        bicubic = T.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = T.Compose([
            T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5)])
        self.geometric_augmentation_local = T.Compose([
            T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5)])
        color_jittering = T.Compose([
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2)])
        global_transfo1_extra = gaussian_blur(p=1.0)
        global_transfo2_extra = T.Compose([gaussian_blur(p=0.1), T.RandomSolarize(threshold=128, p=0.2)])
        local_transfo_extra = gaussian_blur(p=0.5)
        self.normalize = T.Compose([T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])
        self.global_transfo1 = T.Compose([color_jittering, global_transfo1_extra, self.normalize])
        self.global_transfo2 = T.Compose([color_jittering, global_transfo2_extra, self.normalize])
        self.local_transfo = T.Compose([color_jittering, local_transfo_extra, self.normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image):
        output = {}
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        output["global_crops"] = [global_crop_1, global_crop_2]
        output["global_crops_teacher"] = [global_crop_1, global_crop_2]
        output["local_crops"] = [self.local_transfo(self.geometric_augmentation_local(image))
                                 for _ in range(self.local_crops_number)]
        output["offsets"] = ()
        return output


def published_decode(path):
    from PIL import Image

    with open(path, "rb") as handle:  # dinov2/data/decoders.py ImageDataDecoder: Image.open(...).convert("RGB")
        return Image.open(handle).convert(mode="RGB")


def make_pipelines(global_size: int, local_size: int, local_number: int, patch_size: int):
    """name -> (decode(path), prepare(HWC array) for the decoded mode, augment(image, index))."""
    import numpy as np
    import torch
    from PIL import Image

    from dinov2_repro.data.augmentations import MultiCropAugmentation
    from dinov2_repro.data.decode import decode_image_file

    published = PublishedDINOv2Augmentation(local_crops_number=local_number, global_crops_size=global_size,
                                            local_crops_size=local_size)
    pipelines = {"published DINOv2 (PIL)": (published_decode, lambda a: Image.fromarray(np.asarray(a)),
                                            lambda image, i: published(image))}
    for blur_mode in ("as_released", "paper"):
        ours = MultiCropAugmentation(local_crops_number=local_number, global_crops_size=global_size,
                                     local_crops_size=local_size, patch_size=patch_size, blur_mode=blur_mode)
        pipelines[f"ours, blur {blur_mode}"] = (
            decode_image_file, lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous(),
            # one seeded generator per sample, as MultiCropDataset does
            lambda image, i, ours=ours: ours(image, generator=torch.Generator().manual_seed(i)))
    return pipelines


def measure(pipelines: dict, inputs: list, mode: str, seconds: float, rounds: int) -> dict:
    """Interleaved: each round gives every pipeline ``seconds / rounds`` of wall time in turn."""
    stats = {name: {"images": 0, "wall_s": 0.0, "cpu_s": 0.0, "round_rates": []} for name in pipelines}
    loads = [os.getloadavg()[0]]
    prepared = {}
    for name, (decode, prepare, augment) in pipelines.items():
        prepared[name] = inputs if mode == "jpeg" else [prepare(a) for a in inputs]
        image = decode(inputs[0]) if mode == "jpeg" else prepared[name][0]
        augment(image, 0)  # warm-up: lazy imports, allocator
    slice_s = seconds / rounds
    for _ in range(rounds):
        for name, (decode, _, augment) in pipelines.items():
            items, count = prepared[name], 0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            while True:
                item = items[count % len(items)]
                augment(decode(item) if mode == "jpeg" else item, count)
                count += 1
                if time.perf_counter() - wall0 >= slice_s:
                    break
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            entry = stats[name]
            entry["images"] += count
            entry["wall_s"] += wall
            entry["cpu_s"] += cpu
            entry["round_rates"].append(count / wall)
        loads.append(os.getloadavg()[0])
    return {"stats": stats, "load_1min": loads}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=32, help="images per input kind (cycled)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per pipeline and configuration")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved slices per configuration")
    parser.add_argument("--patch-size", type=int, default=14, choices=(14, 16))
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--inputs", nargs="+", default=["colour", "gray"], choices=("colour", "gray"))
    parser.add_argument("--modes", nargs="+", default=["decoded", "jpeg"], choices=("decoded", "jpeg"))
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    import dinov2_repro

    torch.set_num_threads(1)  # what one DataLoader worker gets
    local_size = 98 if args.patch_size == 14 else 96
    results = {"config": dict(vars(args), local_size=local_size, cpu_count=os.cpu_count(), torch=torch.__version__,
                              machine=platform.machine(), package=os.path.dirname(dinov2_repro.__file__),
                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
               "rows": []}
    pipelines = make_pipelines(args.global_size, local_size, args.local_number, args.patch_size)
    baseline = next(iter(pipelines))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.inputs:
            arrays = colour_images(args.n_images) if kind == "colour" else gray_images(args.n_images)
            paths = []
            for i, array in enumerate(arrays):
                paths.append(Path(tmp) / f"{kind}_{i:04d}.jpg")
                Image.fromarray(np.asarray(array)).save(paths[-1], quality=90)
            # decoded mode starts from the decoded JPEGs, so both modes see the same pixels
            decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
            for mode in args.modes:
                run = measure(pipelines, paths if mode == "jpeg" else decoded, mode, args.seconds, args.rounds)
                base = run["stats"][baseline]
                for name, entry in run["stats"].items():
                    per_round = [a / b for a, b in zip(entry["round_rates"], base["round_rates"])]
                    results["rows"].append({
                        "input": kind, "mode": mode, "pipeline": name,
                        "images_per_s": entry["images"] / entry["wall_s"],
                        "images_per_cpu_s": entry["images"] / max(entry["cpu_s"], 1e-9),
                        "ratio": (entry["images"] / entry["wall_s"]) / (base["images"] / base["wall_s"]),
                        "ratio_cpu": (entry["images"] / max(entry["cpu_s"], 1e-9))
                                     / (base["images"] / max(base["cpu_s"], 1e-9)),
                        "ratio_per_round_min_max": (min(per_round), max(per_round)),
                        "ratio_per_round_median": statistics.median(per_round),
                        "images": entry["images"], "load_1min_min_max": (min(run["load_1min"]),
                                                                         max(run["load_1min"]))})
    crops = f"2 x {args.global_size} + {args.local_number} x {local_size}"
    print(f"multi-crop images/s per worker ({crops}, 512 px inputs, 1 thread, {args.seconds:.0f} s per pipeline "
          f"in {args.rounds} interleaved slices; {results['config']['date']}; package {results['config']['package']})")
    print(f"{'input':<7} {'mode':<8} {'pipeline':<24} {'img/s':>7} {'img/cpu-s':>9} {'ratio':>6} "
          f"{'ratio/cpu':>9} {'rounds min-max':>15} {'load 1 min':>11}")
    for row in results["rows"]:
        lo, hi = row["ratio_per_round_min_max"]
        lmin, lmax = row["load_1min_min_max"]
        print(f"{row['input']:<7} {row['mode']:<8} {row['pipeline']:<24} {row['images_per_s']:>7.1f} "
              f"{row['images_per_cpu_s']:>9.1f} {row['ratio']:>6.2f} {row['ratio_cpu']:>9.2f} "
              f"{lo:>7.2f}-{hi:<7.2f} {lmin:>5.2f}-{lmax:<5.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
