"""The images a view is drawn for, and their preprocessing.

``--images`` takes image files, folders (searched recursively) and NIfTI / DICOM volumes, decoded by the project's
datasets (`data.sources`, `data.volumes`, `data.dicom`): a volume contributes a few of its kept slices, chosen
evenly through the volume (deterministic). Whole-slide images are not read (no slide reader in the project yet).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from torch import Tensor


MAX_ASPECT = 4  # a longer side beyond 4 x the shorter is centre-cropped


@dataclass
class VizImage:
    """name: the label in figures; source: the sample it came from (``path``, or a volume slice's sample name);
    pixels: uint8 (3, H, W) as decoded."""

    name: str
    source: str
    pixels: Tensor


def open_path(path: os.PathLike | str):
    """One ``--images`` entry -> an `ImageFileDataset` (unlabelled). Raises naming the path when it holds nothing."""
    from ..data.sources import open_unlabelled

    return open_unlabelled(path, "--images")


def evenly_spaced(n: int, k: int) -> List[int]:
    """k indices spread through range(n), away from both ends (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return [int((i + 1) * n / (k + 1)) for i in range(k)]


def pick_samples(dataset, slices_per_volume: int) -> List[int]:
    """Dataset indices to show: every 2D image, and ``slices_per_volume`` evenly spaced slices of each volume."""
    groups = getattr(dataset, "groups", None) or [p for p, _ in dataset.samples]
    members: Dict[str, List[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(str(group), []).append(index)
    picked = []
    for indices in members.values():
        picked += [indices[i] for i in evenly_spaced(len(indices), slices_per_volume)]
    return sorted(picked)


def collect_images(paths: Sequence[os.PathLike | str], max_images: int = 8,
                   slices_per_volume: int = 3) -> Tuple[List[VizImage], List[str]]:
    """(the first ``max_images`` decodable images of ``paths``, in order; one line per sample that could not be
    decoded, naming it and why)."""
    images: List[VizImage] = []
    skipped: List[str] = []
    for path in paths:
        dataset = open_path(path)
        for index in pick_samples(dataset, slices_per_volume):
            if len(images) >= max_images:
                return images, skipped
            source = dataset.samples[index][0]
            with warnings.catch_warnings(record=True) as caught:  # the reason goes into one line, not a warning
                warnings.simplefilter("always")
                pixels = dataset.load_image(index)
            if pixels is None:
                reason = str(caught[-1].message).splitlines()[0] if caught else "cannot be decoded"
                reason = re.sub(r"^skipping unreadable \w+ ", "", reason)  # the datasets' wording, for a log
                skipped.append(reason if reason.startswith(source) else f"{source}: {reason}")
                continue
            images.append(VizImage(name=Path(source).name, source=source, pixels=pixels))
    if not images:
        raise ValueError(f"--images {', '.join(map(str, paths))}: no decodable image"
                         + (f" ({'; '.join(skipped[:3])})" if skipped else ""))
    return images, skipped


class ViewTransform:
    """uint8 (3, H, W) -> (shown: uint8 (3, h, w); model input: float (3, h, w) normalised), h and w multiples of
    the patch size. The shorter side is resized to ``size`` (bicubic, antialiased, as `EvalTransform`), the aspect
    ratio kept up to ``MAX_ASPECT`` (the backbone interpolates its positional embedding), and the longer side
    centre-cropped to a multiple of the patch. ``square`` resizes the shorter side to ``resize`` (default ``size``)
    and takes the centre size x size crop, which is exactly `eval.features.EvalTransform(resize, size, mean, std)`:
    the input the evaluation protocols see."""

    def __init__(self, size: int, patch_size: int, mean: Sequence[float], std: Sequence[float], square: bool = False,
                 resize: int = 0):
        self.size, self.patch_size, self.square = int(size), int(patch_size), bool(square)
        if self.size < self.patch_size:
            raise ValueError(f"--size {size} is smaller than the backbone's patch size {patch_size}")
        self.size -= self.size % self.patch_size
        self.resize = int(resize) if square and resize else self.size
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        resized = TF.resize(image, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.square:
            crop = [self.size, self.size]
        else:  # bounded token count: attention cost grows with its square
            crop = [min(side, MAX_ASPECT * self.size) // self.patch_size * self.patch_size
                    for side in resized.shape[-2:]]
        shown = TF.center_crop(resized, crop)
        model_input = TF.normalize(shown.float().div(255.0), self.mean, self.std)
        return shown, model_input


def prepare(images: Sequence[VizImage], transform: ViewTransform) -> List[Tuple[Tensor, Tensor]]:
    """[(shown uint8 (3, h, w), model input (1, 3, h, w))] per image; sizes may differ, so no batching."""
    pairs = []
    for image in images:
        shown, model_input = transform(image.pixels)
        pairs.append((shown, model_input.unsqueeze(0)))
    return pairs

