"""Data loading for pretraining: per-sample seeded augmentation, worker seeding, and the builders that read the
config.

Reproducibility design
----------------------
- *Sample order* is a pure function of ``(train.seed, rank, world_size, start)`` (`InfiniteShardedSampler`).
- *Augmentation* of a sample is a pure function of ``(train.seed, global stream position)``: the sampler yields
  ``(index, position)`` pairs and `MultiCropDataset` seeds a fresh ``torch.Generator`` per sample from them.
- *iBOT masks* of a batch are a pure function of ``(train.seed, the batch's stream positions)`` (`SSLCollate`).
Nothing depends on which worker process handles a sample, so a resumed run (``start_iter``) sees bit-identical
batches to an uninterrupted one for any ``num_workers``, and changing ``num_workers`` changes nothing either.
Worker processes are still seeded (numpy / random / torch, from ``(seed, rank, worker id)``) so that any
transform that uses global RNGs is at least deterministic for a fixed number of workers.
"""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from .augmentations import build_multicrop_augmentation
from .collate import SSLCollate
from .datasets import (ClassFolderDataset, ImageFileDataset, UnlabeledFolderDataset,
                       looks_like_class_folder, looks_like_kaggle, resolve_split_dir)
from .masking import MaskingGenerator
from .samplers import InfiniteShardedSampler

log = logging.getLogger("dinov2_repro.data")

_AUGMENT_STREAM = 0x61756731  # separates the augmentation RNG stream from the mask stream


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for the sample at global stream ``position`` of a run with ``seed``."""
    state = np.random.SeedSequence([int(seed), _AUGMENT_STREAM, int(position)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps an image dataset with the multi-crop augmentation for pretraining.

    ``dataset[(index, position)]`` -> ``{"crops": {"global_crops": [...], "local_crops": [...]} or None,
    "label": int, "index": int, "position": int, "path": str}``; the augmentation RNG is seeded from
    ``(seed, position)``. A plain integer key uses torch's (worker-seeded) global RNG and position None.
    ``crops`` is None when the file cannot be decoded (the base dataset has warned); the collate counts it.
    """

    def __init__(self, dataset: ImageFileDataset, transform: Callable, seed: int = 0):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> Dict[str, Any]:
        index, position = (key if isinstance(key, (tuple, list)) else (key, None))
        index = int(index)
        path, label = self.dataset.samples[index]
        sample = {"crops": None, "label": label, "index": index, "position": position, "path": path}
        image = self.dataset.load_image(index)
        if image is not None:
            generator = None
            if position is not None:
                generator = torch.Generator().manual_seed(sample_seed(self.seed, position))
            if torch.utils.data.get_worker_info() is None:
                # In the main process (num_workers=0) torch's intra-op threads fight over these small per-image
                # ops (10x slower on a busy machine); loader workers already run single-threaded. Restored after.
                previous = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    sample["crops"] = self.transform(image, generator=generator)
                finally:
                    torch.set_num_threads(previous)
            else:
                sample["crops"] = self.transform(image, generator=generator)
        return sample


class WorkerSeeder:
    """``worker_init_fn`` seeding numpy, ``random`` and torch in each worker from ``(seed, rank, worker_id)``."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        state = np.random.SeedSequence([self.seed, self.rank, int(worker_id)]).generate_state(2, np.uint32)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))
        torch.manual_seed((int(state[0]) << 32) | int(state[1]))


def make_data_loader(dataset, batch_size: int, sampler, collate_fn: Optional[Callable] = None,
                     num_workers: int = 0, seed: int = 0, rank: int = 0, pin_memory: bool = False,
                     persistent_workers: bool = False, prefetch_factor: Optional[int] = 2,
                     drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler`` with per-rank, per-worker seeding (`WorkerSeeder`).

    ``persistent_workers``/``prefetch_factor`` only apply with workers and are ignored otherwise. With
    ``num_workers=0`` the main process's RNGs are left alone.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kwargs: Dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(worker_init_fn=WorkerSeeder(seed, rank), persistent_workers=bool(persistent_workers))
        if prefetch_factor:
            kwargs["prefetch_factor"] = int(prefetch_factor)
        # The base seed torch hands to workers comes from this generator; fix it so nothing depends on the
        # main process's RNG state (WorkerSeeder overrides it anyway).
        kwargs["generator"] = torch.Generator().manual_seed(int(seed) * 1000 + int(rank))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                                       num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                                       **kwargs)


def resolve_data_kind(path: str, kind: str = "auto", split: str = "") -> str:
    """The concrete kind for ``data.kind`` ("auto" inspects the path): csv | kaggle | nifti | dicom | mixed |
    class_folder | folder | synthetic | wsi_tiles (coordinates tables of ``dinov2-repro wsi tile``)."""
    if kind != "auto":
        return kind
    p = Path(path)
    if looks_like_tile_tables(p):
        return "wsi_tiles"
    if p.suffix.lower() == ".csv":
        return "csv"
    if not p.exists():
        raise FileNotFoundError(f"data.path does not exist: {path} (data.kind=auto; use data.kind=synthetic to "
                                f"generate the built-in synthetic dataset there)")
    if p.is_dir() and (looks_like_kaggle(p) or (split and (p / split).is_dir())):
        return "kaggle"
    volume_kind = volume_files_kind(p)
    if volume_kind:
        return volume_kind
    if looks_like_class_folder(p):
        return "class_folder"
    return "folder"


def looks_like_tile_tables(path: Path) -> bool:
    """A coordinates table of ``dinov2-repro wsi tile`` (``*.tiles.csv``) or a folder holding such tables."""
    suffix = ".tiles.csv"  # dinov2_repro.wsi.tiler.TILES_SUFFIX, not imported: the data layer stays independent
    if path.name.lower().endswith(suffix):
        return True
    return path.is_dir() and any(p.name.lower().endswith(suffix) for p in path.iterdir() if p.is_file())


def volume_files_kind(path: Path) -> Optional[str]:
    """"nifti" or "dicom" for a file of that kind or a folder of such files alone, "mixed" for a folder that holds
    several kinds (2D images next to volumes, or NIfTI next to DICOM); None for images alone or nothing known."""
    from .sources import folder_kinds

    kinds = folder_kinds(path)
    if kinds in (["nifti"], ["dicom"]):
        return kinds[0]
    return "mixed" if len(kinds) > 1 else None


def build_image_dataset(path: str, kind: str = "auto", split: str = "", synthetic_n_per_class: int = 64,
                        transform: Optional[Callable] = None,
                        synthetic_n_test_per_class: Optional[int] = None, data_cfg=None,
                        labelled: bool = True) -> ImageFileDataset:
    """The raw image dataset described by ``data.path/kind/split`` (no augmentation).

    ``kaggle`` (and ``synthetic``) with an empty split use ``Training``, so pretraining never sees the test
    split by accident. ``synthetic`` generates the built-in phantoms at ``path`` first if needed.
    """
    if not path:
        raise ValueError("data.path is empty: set it to a dataset folder, a CSV manifest or a synthetic output folder")
    kind = resolve_data_kind(path, kind, split)
    if kind == "synthetic":
        from .synthetic import generate_dataset

        generate_dataset(path, n_per_class=synthetic_n_per_class, n_test_per_class=synthetic_n_test_per_class)
        kind, split = "kaggle", split or "Training"
    if kind == "csv":
        from .sources import manifest_dataset

        return manifest_dataset(path, split=split or None, cfg_data=data_cfg, transform=transform)
    if kind == "kaggle":
        if not split:
            warnings.warn(f"data.split is empty for the Kaggle layout at {path}: using 'Training'", stacklevel=2)
            split = "Training"
        return ClassFolderDataset(path, split=split, transform=transform)
    if kind == "class_folder":
        return ClassFolderDataset(path, split=split or None, transform=transform)
    if kind == "folder":
        return UnlabeledFolderDataset(resolve_split_dir(path, split or None), transform=transform)
    if kind == "nifti":
        from .volumes import volume_dataset

        return volume_dataset(resolve_split_dir(path, split or None), data_cfg, transform=transform,
                              labelled=labelled)
    if kind == "dicom":
        from .dicom import dicom_dataset

        return dicom_dataset(resolve_split_dir(path, split or None), data_cfg, transform=transform, labelled=labelled)
    if kind == "mixed":
        from .sources import mixed_folder_dataset

        return mixed_folder_dataset(resolve_split_dir(path, split or None), data_cfg, transform=transform,
                                    labelled=labelled)
    if kind == "wsi_tiles":
        from ..wsi.tiles import WsiTileDataset

        return WsiTileDataset(path, transform=transform)
    raise ValueError(f"data.kind={kind!r} is not one of auto, folder, class_folder, kaggle, csv, synthetic, nifti, "
                     f"dicom, mixed, wsi_tiles")


def describe_dataset(images: ImageFileDataset, path: str, kind: str) -> str:
    """One line saying what will be read: kind, path, image count, classes."""
    classes = images.classes
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")
    labels = f"{len(classes)} classes ({shown})" if classes else "unlabeled"
    return (f"data: {kind} at {path}: {len(images)} images, {labels}; unreadable files are skipped, named and "
            f"counted as they are met")


def build_pretraining_images(cfg) -> ImageFileDataset:
    """The unlabelled images of a config's ``data.path/kind/split``, described in the log."""
    path, split = str(cfg.data.path), str(cfg.data.split or "")
    kind = resolve_data_kind(path, str(cfg.data.kind), split)
    if kind == "class_folder" and cfg.data.kind == "auto":
        kind = "folder"  # pretraining uses no labels: sub-folders (patient_*, ...) are not taken for classes
    images = build_image_dataset(path, kind, split, int(cfg.data.synthetic_n_per_class),
                                 synthetic_n_test_per_class=cfg.data.synthetic_n_test_per_class, data_cfg=cfg.data,
                                 labelled=False)  # pretraining uses no labels
    log.info("%s", describe_dataset(images, path + (f" (split {split})" if split else ""), kind))
    return images


def build_ssl_dataset(cfg) -> MultiCropDataset:
    """The pretraining dataset of a config: ``data.path/kind/split`` images with the multi-crop augmentation of
    ``crops.*`` and ``data.augmentation/blur_mode/mean/std``, seeded by ``train.seed``."""
    return MultiCropDataset(build_pretraining_images(cfg), build_multicrop_augmentation(cfg), seed=int(cfg.train.seed))


def build_mask_generator(cfg) -> MaskingGenerator:
    """Block masks on the global-crop patch grid, at most half of it (DINOv2 default)."""
    side = int(cfg.crops.global_crops_size) // int(cfg.student.patch_size)
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)


def build_ssl_data_loader(cfg, rank: int = 0, world_size: int = 1, start_iter: int = 0,
                          dataset: Optional[MultiCropDataset] = None) -> torch.utils.data.DataLoader:
    """The infinite pretraining loader of one rank, resumed at loader batch ``start_iter``.

    ``start_iter`` counts batches drawn from this loader (with gradient accumulation: optimiser steps x
    ``train.grad_accum_steps``); this rank skips ``start_iter * train.batch_size_per_gpu`` samples in O(1).
    """
    if str(cfg.data.augmentation_device) == "cuda":
        return build_device_augment_loader(cfg, rank, world_size, start_iter)
    dataset = dataset if dataset is not None else build_ssl_dataset(cfg)
    collate = SSLCollate(build_mask_generator(cfg), mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                         mask_probability=float(cfg.ibot.mask_sample_probability), seed=int(cfg.train.seed),
                         local_crops_size=int(cfg.crops.local_crops_size))
    return sharded_loader(cfg, dataset, collate, rank, world_size, start_iter, torch.cuda.is_available())


def sharded_loader(cfg, dataset, collate, rank: int, world_size: int, start_iter: int, pin: bool):
    """The infinite, rank-sharded, resumable pretraining DataLoader over ``dataset`` with ``collate``."""
    batch_size, seed = int(cfg.train.batch_size_per_gpu), int(cfg.train.seed)
    sampler = InfiniteShardedSampler(len(dataset), rank=rank, world_size=world_size, seed=seed,
                                     start=int(start_iter) * batch_size, shuffle=True, with_positions=True)
    return make_data_loader(dataset, batch_size, sampler, collate, num_workers=int(cfg.data.num_workers), seed=seed,
                            rank=rank, pin_memory=bool(cfg.data.pin_memory) and pin,
                            persistent_workers=bool(cfg.data.persistent_workers),
                            prefetch_factor=int(cfg.data.prefetch_factor), drop_last=True)


def augmentation_device(cfg) -> torch.device:
    """Where ``data.augmentation_device=cuda`` runs the crops: this process's GPU; the CPU (main process) only
    when the run itself is on the CPU, which is a functional check rather than a speed-up."""
    if str(cfg.compute.device) != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    warnings.warn("data.augmentation_device=cuda on a CPU run: the batched augmentation runs in the main process "
                  "on the CPU (same crops, no speed-up); use data.augmentation_device=cpu", stacklevel=2)
    return torch.device("cpu")


def build_device_augment_loader(cfg, rank: int = 0, world_size: int = 1, start_iter: int = 0):
    """``data.augmentation_device=cuda``: the workers decode (shrinking to ``data.augmentation_max_side``), draw
    each sample's random numbers as the CPU pipeline would, and collate a uint8 canvas with the iBOT masks; the
    crops and colour operations then run per batch on the device (`batched_augment`). Same sampler, resume
    position and masks as `build_ssl_data_loader`."""
    from .batched_augment import (BatchedMultiCrop, DeviceAugmentCollate, DeviceAugmentDraws,
                                  DeviceAugmentedLoader, recipe_from_config)

    recipe, seed, device = recipe_from_config(cfg), int(cfg.train.seed), augmentation_device(cfg)
    draws = DeviceAugmentDraws(recipe, int(cfg.data.augmentation_max_side))
    dataset = MultiCropDataset(build_pretraining_images(cfg), draws, seed=seed)
    collate = DeviceAugmentCollate(recipe, build_mask_generator(cfg), tuple(cfg.ibot.mask_ratio_min_max),
                                   float(cfg.ibot.mask_sample_probability), seed=seed)
    loader = sharded_loader(cfg, dataset, collate, rank, world_size, start_iter, device.type == "cuda")
    return DeviceAugmentedLoader(loader, BatchedMultiCrop(recipe, device))
