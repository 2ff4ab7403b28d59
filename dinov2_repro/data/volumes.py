"""NIfTI volumes as 2D slices (nibabel): one dataset that the pretraining and evaluation pipelines read like images.

Each ``.nii`` / ``.nii.gz`` volume is reoriented to the closest canonical orientation (RAS+), so the same anatomy
gives the same slices whatever the file's own axis order and flips. Slices are taken along ``axis`` (axial by
default, the S axis), shown with anterior at the top. Intensities are normalised per volume robustly: the 0.5 and
99.5 percentiles of the foreground voxels map to 0 and 255. Slices whose foreground fraction is below
``min_foreground`` are skipped (background above the head, below the neck). A 4D volume gives its ``volume_index``
volume, or each (``-1``). The 2.5D mode stacks the slices below, at and above as the 3 channels. With
``slice_spacing_mm`` > 0 the kept slices are thinned to at least that distance apart (the voxel size along the
slicing axis of the reoriented volume).

`VolumeSliceDataset` indexes (volume, slice) pairs when it is built (one read of each volume, with a progress bar)
and decodes on access, keeping recently used volumes in a per-process cache bounded in megabytes. Its samples are
``<volume path>::<axis>=<slice>`` so everything keyed by paths (skipped files, predictions, splits) names the
slice, and `groups` gives each sample's volume, so that splits can keep a volume's slices on one side.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import UNLABELED, ImageFileDataset

NIFTI_SUFFIXES = (".nii", ".nii.gz")
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS+ array axes
SLICE_MARK = "::"


def is_nifti(path: os.PathLike | str) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES) and not Path(path).name.startswith(".")


def nifti_files_under(folder: Path) -> List[str]:
    """Every NIfTI file below ``folder`` (recursive, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if is_nifti(f)]
    return sorted(found)


def slice_path(volume: str, axis: str, index: int, t: Optional[int] = None) -> str:
    """``<volume>::axial=12`` (or ``...,t=3`` for volume 3 of a 4D file): what names a slice everywhere."""
    return f"{volume}{SLICE_MARK}{axis}={index}" + (f",t={t}" if t is not None else "")


def split_slice_path(sample: str) -> Tuple[str, Optional[int], int]:
    """``<volume>::<axis>=<k>[,t=<t>]`` -> (volume path, k, t); a plain path -> (path, None, 0)."""
    volume, mark, rest = sample.rpartition(SLICE_MARK)
    if not mark:
        return sample, None, 0
    fields = dict(part.split("=", 1) for part in rest.split(","))
    return volume, int(next(v for key, v in fields.items() if key in AXES)), int(fields.get("t", 0))


def read_nifti(path: os.PathLike | str, volume_index: int = 0) -> List[np.ndarray]:
    """The volume(s) of a NIfTI file in RAS+ orientation, float32: a 3D file gives one, a 4D file its
    ``volume_index``-th volume or, with -1, every volume."""
    return read_nifti_with_spacing(path, volume_index)[0]


def read_nifti_with_spacing(path: os.PathLike | str, volume_index: int = 0) -> Tuple[List[np.ndarray], np.ndarray]:
    """`read_nifti`'s volumes and the voxel size in mm along each RAS+ array axis (from the reoriented affine, so
    the slicing axis's spacing is the right one whatever the file's own axis order)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    spacing = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    return _volumes_of(path, np.asarray(image.dataobj, dtype=np.float32), volume_index), spacing


def _volumes_of(path, data: np.ndarray, volume_index: int) -> List[np.ndarray]:
    if data.ndim == 3:
        return [data]
    if data.ndim == 4:
        if volume_index < 0:
            return [data[..., t] for t in range(data.shape[3])]
        if volume_index >= data.shape[3]:
            raise ValueError(f"{path}: volume index {volume_index}, but the file holds {data.shape[3]} volumes")
        return [data[..., volume_index]]
    raise ValueError(f"{path}: a {data.ndim}-D image; volumes are 3-D or 4-D")


def spaced_indices(positions: Sequence[float], min_mm: float) -> List[int]:
    """Indices into ``positions`` (mm along the slicing axis, in slice order) such that each kept slice is at least
    ``min_mm`` from the one kept before it, greedily from the first; every index when ``min_mm`` <= 0. Positions
    rather than a fixed step, so that irregularly spaced DICOM series are thinned by distance too."""
    if min_mm <= 0:
        return list(range(len(positions)))
    kept: List[int] = []
    for i, position in enumerate(positions):
        if not kept or abs(position - positions[kept[-1]]) >= min_mm - 1e-3:  # 1 µm: float positions in headers
            kept.append(i)
    return kept


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Voxels above 10% of the robust range (background of MRI is near the minimum)."""
    low, high = float(volume.min()), float(np.percentile(volume, 99.5))
    return volume > low + 0.1 * (high - low)


def normalise_volume(volume: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """uint8 volume: the given percentiles of the foreground voxels map to 0 and 255 (clipped beyond)."""
    foreground = volume[foreground_mask(volume)]
    values = foreground if foreground.size else volume.ravel()
    low, high = np.percentile(values, list(percentiles))
    if high <= low:
        return np.zeros(volume.shape, np.uint8)
    return np.clip((volume - low) / (high - low) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def oriented_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(H, W) slice ``index`` along RAS+ ``axis``, rotated so that the second in-plane axis runs top to bottom
    from its positive end (anterior or superior at the top)."""
    return np.rot90(np.take(volume, index, axis=axis))


class VolumeCache:
    """Recently used decoded volumes, the least recently used dropped first beyond ``megabytes`` (one per process:
    each loader worker keeps its own)."""

    def __init__(self, megabytes: float):
        self.limit, self.nbytes, self.items = int(megabytes * 2**20), 0, OrderedDict()

    def get(self, key, load):
        """The cached value of ``key``, or ``load()`` remembered under it."""
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return self.put(key, load())

    def put(self, key, value: np.ndarray) -> np.ndarray:
        if key in self.items:
            self.nbytes -= self.items.pop(key).nbytes
        self.items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.limit and len(self.items) > 1:
            self.nbytes -= self.items.popitem(last=False)[1].nbytes
        return value


class VolumeSliceDataset(ImageFileDataset):
    """The kept slices of every NIfTI volume under ``root`` (or in ``files``), as uint8 (3, H, W) images.

    ``labels``: volume path -> class index (class folders), else unlabeled. ``groups[i]`` is the volume of sample i.
    """

    def __init__(self, files: Sequence[str], classes: Sequence[str], root: str, labels: Optional[Dict[str, int]]
                 = None, *, axis: str = "axial", min_foreground: float = 0.05, two_and_a_half_d: bool = False,
                 volume_index: int = 0, percentiles: Sequence[float] = (0.5, 99.5), cache_mb: float = 512,
                 slice_spacing_mm: float = 0.0, transform=None, progress: bool = False):
        if axis not in AXES:
            raise ValueError(f"data.volume_axis={axis!r} is not one of {tuple(AXES)}")
        self.axis_name, self.axis = axis, AXES[axis]
        self.min_foreground, self.two_and_a_half_d = float(min_foreground), bool(two_and_a_half_d)
        self.volume_index, self.percentiles = int(volume_index), tuple(percentiles)
        self.slice_spacing_mm = float(slice_spacing_mm)
        self._cache = VolumeCache(cache_mb)
        self.skipped_volumes: List[Tuple[str, str]] = []  # (path, reason)
        samples, self.groups = [], []
        iterator = files
        if progress:
            from tqdm import tqdm

            iterator = tqdm(files, desc="indexing volumes", unit="volume")
        for path in iterator:
            kept = self._index_volume(path)
            if kept is None:
                continue
            label = (labels or {}).get(path, UNLABELED)
            for t, k in kept:
                samples.append((slice_path(path, self.axis_name, k, t if self.volume_index < 0 else None), label))
                self.groups.append(path)
        super().__init__(samples, classes, root, transform)
        if self.skipped_volumes:
            shown = "; ".join(f"{p} ({why})" for p, why in self.skipped_volumes[:3])
            warnings.warn(f"skipped {len(self.skipped_volumes)} unreadable volume(s): {shown}", RuntimeWarning)

    def _index_volume(self, path: str) -> Optional[List[Tuple[int, int]]]:
        """(volume index, slice) pairs kept for one file; None (counted and named) when it cannot be read."""
        try:
            volumes, spacing = read_nifti_with_spacing(path, self.volume_index)
        except Exception as exc:  # a truncated or foreign file must not end a long indexing run
            self.skipped_volumes.append((path, f"{type(exc).__name__}: {exc}"))
            return None
        kept = []
        for t, volume in enumerate(volumes):
            fraction = foreground_mask(volume).mean(axis=tuple(a for a in range(3) if a != self.axis))
            slices = np.flatnonzero(fraction >= self.min_foreground)
            slices = slices[spaced_indices(slices * spacing[self.axis], self.slice_spacing_mm)]
            kept += [(t, int(k)) for k in slices]
            self._cache.put((path, t), normalise_volume(volume, self.percentiles))  # read once, not again on access
        return kept

    def _volume(self, path: str, t: int) -> np.ndarray:
        """Volume ``t`` of ``path`` (0 unless every volume of a 4D file is used), normalised, via the cache."""
        return self._cache.get((path, t), lambda: normalise_volume(read_nifti(path, self.volume_index)[t],
                                                                   self.percentiles))

    def load_image(self, index: int):
        sample = self.samples[index][0]
        path, k, t = split_slice_path(sample)
        try:
            volume = self._volume(path, t)
        except Exception as exc:
            if sample not in self._warned:
                self._warned.add(sample)
                warnings.warn(f"skipping unreadable slice {sample}: {type(exc).__name__}: {exc}", RuntimeWarning,
                              stacklevel=2)
            return None
        if self.two_and_a_half_d:
            last = volume.shape[self.axis] - 1
            channels = [oriented_slice(volume, self.axis, min(max(k + d, 0), last)) for d in (-1, 0, 1)]
        else:
            channels = [oriented_slice(volume, self.axis, k)] * 3
        return torch.from_numpy(np.ascontiguousarray(np.stack(channels)))


def volume_dataset(root: os.PathLike | str, cfg_data=None, transform=None, progress: Optional[bool] = None,
                   labelled: bool = True) -> VolumeSliceDataset:
    """The volumes under ``root``: class folders (``root/<class>/**/*.nii.gz``) give labels, a flat folder (or
    ``labelled=False``: pretraining, where sub-folders are patients, not classes) none."""
    root = Path(root)
    files = nifti_files_under(root)
    if not files:
        raise FileNotFoundError(f"no NIfTI volumes (.nii, .nii.gz) under {root}")
    top = sorted({Path(f).relative_to(root).parts[0] for f in files})
    labelled = labelled and all(len(Path(f).relative_to(root).parts) > 1 for f in files)
    classes = top if labelled else []
    labels = {f: classes.index(Path(f).relative_to(root).parts[0]) for f in files} if labelled else None
    progress = len(files) > 50 if progress is None else progress  # indexing reads every volume once
    return VolumeSliceDataset(files, classes, str(root), labels, transform=transform, progress=progress,
                              **volume_options(cfg_data))


def volume_options(cfg_data) -> Dict[str, object]:
    """`VolumeSliceDataset` keyword arguments from a config's data section (the defaults without one)."""
    if cfg_data is None:
        return {}
    return dict(axis=str(cfg_data.volume_axis), min_foreground=float(cfg_data.volume_min_foreground),
                two_and_a_half_d=bool(cfg_data.volume_25d), volume_index=int(cfg_data.volume_index),
                slice_spacing_mm=float(cfg_data.slice_spacing_mm))
