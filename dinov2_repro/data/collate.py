"""Collate multi-crop samples into the SSL batch and draw the iBOT masks (names follow Meta's collate).

Batch keys (crop-major: all first global crops, then all second ones; B = kept samples):
  collated_global_crops (n_global*B, 3, G, G), collated_local_crops (n_local*B, 3, L, L) (0 rows without locals),
  collated_masks (n_global*B, N) bool, mask_indices_list (M,) long indices into the flattened masks,
  masks_weight (M,) float = 1 / (#masked tokens of that image), n_masked_patches long (1,), upperbound int,
  n_skipped int, skipped_paths list[str].

Masking (iBOT / DINOv2): of the n_global*B global-crop images, int(n_global*B * mask_probability) are masked;
their ratios are stratified: with probs = linspace(min, max, n_masked + 1), masked image i gets a ratio drawn
uniformly in [probs[i], probs[i+1]], so every batch spans the whole ratio range. Which images are masked is
shuffled. ``upperbound`` = sum of int(N * probs[i+1]), a fixed-size bound for buffers.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .masking import MaskingGenerator

_MASK_STREAM = 0x6D61736B  # separates the mask RNG stream from the augmentation stream of the same positions


def unpack_sample(sample) -> Tuple[Optional[dict], Optional[str], Optional[int]]:
    """(crops, path, stream position) from a `MultiCropDataset` dict, a ``(crops, label)`` tuple or None."""
    if sample is None:
        return None, None, None
    if isinstance(sample, dict) and "crops" in sample:
        return sample["crops"], sample.get("path"), sample.get("position")
    crops = sample[0] if isinstance(sample, (tuple, list)) else sample
    return crops, None, None


class UndecodableBatchError(RuntimeError):
    """Every sample of a batch failed to decode: most often a dataset without one readable image."""


def mask_rng_for_positions(seed: int, positions: Sequence[int]) -> np.random.Generator:
    """The mask RNG of a batch: a function of the run seed and the stream positions of its samples only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _MASK_STREAM, *map(int, positions)]))


def collate_data_and_cast(samples_list: Sequence[Any], mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
                          mask_probability: float = 0.5, n_tokens: Optional[int] = None,
                          mask_generator: Optional[MaskingGenerator] = None, dtype: Optional[torch.dtype] = None,
                          rng: Optional[np.random.Generator] = None, local_crops_size: int = 0) -> Dict[str, Any]:
    """Stack the crops of ``samples_list`` crop-major, draw stratified block masks, optionally cast the crops.

    Undecodable samples (None, or a dataset dict whose ``crops`` is None) are dropped and counted in
    ``n_skipped``/``skipped_paths``; a batch with no sample left raises naming the paths. ``rng`` (numpy
    Generator) drives the masks; with None one is drawn from torch's RNG, which the loader seeds per worker.
    """
    kept, skipped_paths, n_skipped = [], [], 0
    for sample in samples_list:
        crops, path, _ = unpack_sample(sample)
        if crops is None:
            n_skipped += 1
            if path is not None:
                skipped_paths.append(str(path))
        else:
            kept.append(crops)
    if not kept:
        distinct = sorted(set(skipped_paths))
        raise UndecodableBatchError(
            f"none of the {n_skipped} images of a batch could be decoded ({len(distinct)} distinct files, e.g. "
            f"{', '.join(distinct[:3]) or 'no paths given'}); check that the dataset holds readable images")
    n_global = len(kept[0]["global_crops"])
    n_local = len(kept[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][i] for i in range(n_global) for s in kept])
    if n_local:
        local_crops = torch.stack([s["local_crops"][i] for i in range(n_local) for s in kept])
    else:
        local_crops = torch.empty((0, global_crops.shape[1], local_crops_size, local_crops_size),
                                  dtype=global_crops.dtype)

    if mask_generator is None:
        grid = n_tokens if n_tokens is not None else 0
        side = int(round(grid ** 0.5))
        if side * side != grid or grid == 0:
            raise ValueError(f"pass mask_generator, or n_tokens as a square grid size (got n_tokens={n_tokens})")
        mask_generator = MaskingGenerator((side, side))
    n_tokens = mask_generator.num_patches if n_tokens is None else int(n_tokens)
    if n_tokens != mask_generator.num_patches:
        raise ValueError(f"n_tokens={n_tokens} does not match the mask generator grid "
                         f"{mask_generator.get_shape()} = {mask_generator.num_patches} patches")
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    n_images = global_crops.shape[0]
    n_masked = int(n_images * mask_probability)
    probs = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked + 1)
    ratios = probs[:-1] + (probs[1:] - probs[:-1]) * rng.random(n_masked)
    masks = [mask_generator(int(n_tokens * ratio), rng=rng) for ratio in ratios]
    upperbound = int(sum(int(n_tokens * p) for p in probs[1:]))
    masks += [np.zeros(mask_generator.get_shape(), dtype=bool)] * (n_images - n_masked)
    order = rng.permutation(n_images)
    collated_masks = torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_images, -1))

    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image = collated_masks.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    masks_weight = (1.0 / per_image).expand_as(collated_masks)[collated_masks]
    if dtype is not None:
        global_crops, local_crops = global_crops.to(dtype), local_crops.to(dtype)
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
        "upperbound": upperbound,
        "n_skipped": n_skipped,
        "skipped_paths": skipped_paths,
    }


class SSLCollate:
    """Picklable collate for the SSL loader: masks seeded from ``(seed, stream positions of the batch)``.

    With samples from `MultiCropDataset` (which carry their stream position) the masks of a batch are the same
    whatever the number of workers and across a resume; otherwise the torch RNG of the worker is used.
    """

    def __init__(self, mask_generator: MaskingGenerator, mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
                 mask_probability: float = 0.5, dtype: Optional[torch.dtype] = None, seed: int = 0,
                 local_crops_size: int = 0):
        self.mask_generator = mask_generator
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = float(mask_probability)
        self.dtype = dtype
        self.seed = int(seed)
        self.local_crops_size = int(local_crops_size)

    def __call__(self, samples_list: Sequence[Any]) -> Dict[str, Any]:
        positions = [unpack_sample(s)[2] for s in samples_list]
        rng = None
        if positions and all(p is not None for p in positions):
            rng = mask_rng_for_positions(self.seed, positions)
        return collate_data_and_cast(samples_list, self.mask_ratio_tuple, self.mask_probability,
                                     n_tokens=self.mask_generator.num_patches, mask_generator=self.mask_generator,
                                     dtype=self.dtype, rng=rng, local_crops_size=self.local_crops_size)
