"""Per-channel mean and standard deviation of a dataset on the [0, 1] scale, for ``data.mean``/``data.std``.

Exact and vectorised: each image contributes a (3, 256) histogram of its uint8 values (one ``bincount``), so the
moments are computed from integer counts with no rounding drift, and decoding can run in DataLoader workers.
Images are weighted by their pixel count (every pixel counts once), as a normalisation layer sees them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .datasets import ImageFileDataset


class _Histograms(torch.utils.data.Dataset):
    """Per-image (3, 256) int64 histograms of a dataset's decoded images (None when undecodable)."""

    def __init__(self, dataset: ImageFileDataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = self.dataset.load_image(index)
        if image is None:
            return None, self.dataset.samples[index][0]
        offsets = torch.arange(3, dtype=torch.int64).view(3, 1) * 256
        flat = (image.reshape(3, -1).to(torch.int64) + offsets).flatten()
        return torch.bincount(flat, minlength=3 * 256).view(3, 256), None


def _keep_as_list(batch):
    return batch


def histogram_moments(histogram: np.ndarray):
    """(mean, std) per channel on the [0, 1] scale from a (3, 256) count histogram."""
    values = np.arange(256, dtype=np.float64) / 255.0
    counts = histogram.astype(np.float64)
    total = counts.sum(axis=1)
    mean = (counts * values).sum(axis=1) / total
    var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / total
    return mean, np.sqrt(var)


def compute_mean_std(dataset: ImageFileDataset, max_images: Optional[int] = None, seed: int = 0,
                     num_workers: int = 0, progress: bool = True) -> dict:
    """Mean/std per channel over ``dataset`` (or a seeded random subset of ``max_images`` images).

    Returns ``{"mean": [3 floats], "std": [3 floats], "n_images", "n_pixels", "n_skipped", "skipped_paths"}``.
    """
    n = len(dataset)
    indices = np.arange(n)
    if max_images is not None and 0 < max_images < n:
        indices = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    loader = torch.utils.data.DataLoader(_Histograms(dataset, indices.tolist()), batch_size=16,
                                         num_workers=num_workers, collate_fn=_keep_as_list)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(loader), desc="image statistics", unit="batch")
    total = np.zeros((3, 256), dtype=np.int64)
    skipped = []
    for batch in loader:
        for histogram, bad_path in batch:
            if histogram is None:
                skipped.append(bad_path)
            else:
                total += histogram.numpy()
    n_images = len(indices) - len(skipped)
    if n_images == 0:
        raise ValueError(f"no decodable image in {dataset.root} ({len(skipped)} unreadable)")
    mean, std = histogram_moments(total)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "n_images": n_images,
            "n_pixels": int(total[0].sum()), "n_skipped": len(skipped), "skipped_paths": skipped}


def format_yaml(stats: dict, digits: int = 4) -> str:
    """``data.mean: [...]`` / ``data.std: [...]`` lines to paste into a preset (or pass as overrides)."""
    def fmt(values):
        return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"

    return f"data.mean: {fmt(stats['mean'])}\ndata.std: {fmt(stats['std'])}"
