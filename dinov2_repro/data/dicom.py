"""DICOM series as 2D slices (pydicom): grouping, slice order, intensities, windowing.

- Files are grouped by SeriesInstanceUID; a multi-frame file is a series of its own.
- Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of the two
  ImageOrientationPatient direction cosines), falling back to InstanceNumber when a position is missing.
- RescaleSlope and RescaleIntercept are applied (stored values -> modality units, e.g. Hounsfield units), and
  MONOCHROME1 (low values shown bright) is inverted, so that bright means high signal everywhere.
- Windowing (``data.dicom_window``): ``percentile`` (default; robust per series, as MRI has no absolute units),
  ``file`` (the first slice's WindowCenter/WindowWidth), or a named preset of `WINDOW_PRESETS`.
- A file pydicom cannot decode (a compressed transfer syntax without its plugin, a truncated file) is skipped and
  named with its transfer syntax: a long indexing run never dies on one file.

`DicomSliceDataset` keeps the slices with enough foreground. A single-frame slice's sample is its own file; a frame
of a multi-frame file is ``<file>::frame=<k>``. `groups` holds each slice's PatientID (else its series), so that
splits can keep a patient on one side. Series are decoded on access through a per-process cache bounded in MB.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .datasets import UNLABELED, ImageFileDataset
from .volumes import VolumeCache, foreground_mask, normalise_volume, spaced_indices

# (center, width) in modality units
WINDOW_PRESETS = {"brain": (40.0, 80.0), "subdural": (75.0, 215.0), "bone": (600.0, 2800.0),
                  "soft_tissue": (50.0, 350.0), "lung": (-600.0, 1500.0)}


class DicomError(ValueError):
    """A DICOM file that cannot be used; the message names the file, and the transfer syntax when it matters."""


def is_dicom(path: os.PathLike | str) -> bool:
    """A ``.dcm`` file, or an extension-less file with the DICM preamble (many scanners write no extension)."""
    path = Path(path)
    if path.name.startswith("."):
        return False
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_files_under(folder: Path) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if is_dicom(os.path.join(dirpath, f))]
    return sorted(found)


def _position_along_normal(ds) -> Optional[float]:
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or position is None:
        return None
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return float(np.dot(np.cross(row, column), np.asarray(position, float)))


def group_series(files: Sequence[str]) -> Tuple[Dict[str, List[str]], Dict[str, str], List[Tuple[str, str]]]:
    """(SeriesInstanceUID -> its files in slice order, series -> patient, unreadable files with the reason)."""
    import pydicom

    entries: Dict[str, List[Tuple[float, int, str]]] = defaultdict(list)
    patient: Dict[str, str] = {}
    failed = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            failed.append((path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"))
            continue
        uid = str(ds.get("SeriesInstanceUID") or path)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            uid = f"{uid}:{path}"  # a multi-frame file holds its series alone
        position = _position_along_normal(ds)
        entries[uid].append((np.nan if position is None else position, int(ds.get("InstanceNumber") or 0), path))
        patient[uid] = str(ds.get("PatientID") or uid)
    ordered = {}
    for uid, slices in entries.items():
        by_position = not any(np.isnan(p) for p, _, _ in slices)
        slices.sort(key=(lambda s: (s[0], s[1], s[2])) if by_position else (lambda s: (s[1], s[2])))
        ordered[uid] = [path for _, _, path in slices]
    return ordered, patient, failed


def read_frames(path: str):
    """(frames (n, H, W) float32 in modality units with MONOCHROME1 inverted, the dataset) of one file."""
    import pydicom
    from pydicom.pixels import apply_rescale

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DicomError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    try:
        array = ds.pixel_array
    except Exception as exc:  # no handler for the transfer syntax, or corrupt pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(f"{path}: cannot decode the pixels (transfer syntax {name}; {type(exc).__name__}: {exc}); "
                         f"compressed files need pydicom's pixel-data plugins: pip install -e '.[dicom]'") from exc
    frames = np.asarray(apply_rescale(array, ds), dtype=np.float32)
    frames = frames[None] if frames.ndim == 2 else frames
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        frames = frames.max() + frames.min() - frames  # low stored values are bright: flip within the range
    return frames, ds


def read_series(paths: Sequence[str]):
    """One series (files in slice order, or one multi-frame file) -> ((slices, H, W) float32, first dataset)."""
    volume, datasets = read_series_headers(paths)
    return volume, datasets[0]


def read_series_headers(paths: Sequence[str]):
    """`read_series`, with every file's dataset (their positions give the slice spacing)."""
    read = [read_frames(path) for path in paths]
    shapes = sorted({frames.shape[1:] for frames, _ in read})
    if len(shapes) != 1:
        raise DicomError(f"{paths[0]}: the series mixes slice sizes {shapes}")
    return np.concatenate([frames for frames, _ in read]), [ds for _, ds in read]


def slice_positions(datasets: Sequence, n_slices: int) -> Optional[List[float]]:
    """Each slice's position in mm along the slice normal: ImagePositionPatient of each file, else slice k at
    k x SpacingBetweenSlices (or SliceThickness) of the first file (multi-frame files); None when neither is known."""
    if len(datasets) == n_slices:
        positions = [_position_along_normal(ds) for ds in datasets]
        if all(p is not None for p in positions):
            return positions
    first = datasets[0]
    shared = first.get("SharedFunctionalGroupsSequence")
    measures = shared[0].get("PixelMeasuresSequence") if shared else None
    for source in ([measures[0]] if measures else []) + [first]:
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            if source.get(key) not in (None, "") and float(source.get(key)) > 0:
                return [k * float(source.get(key)) for k in range(n_slices)]
    return None


def window(volume: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 of the linear window [center - width / 2, center + width / 2] -> [0, 255], clipped outside."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return np.clip((volume - (center - width / 2.0)) / width * 255.0 + 0.5, 0, 255).astype(np.uint8)


def windowed(volume: np.ndarray, ds, mode: str = "percentile") -> np.ndarray:
    """The uint8 series under windowing ``mode`` (see the module docstring)."""
    if mode == "percentile":
        return normalise_volume(volume)
    if mode == "file":
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            raise DicomError("data.dicom_window=file, but the series has no WindowCenter/WindowWidth")
        # a multi-valued window lists alternatives; the first is the default one
        return window(volume, *(float(np.atleast_1d(np.asarray(v, dtype=float))[0]) for v in (center, width)))
    if mode not in WINDOW_PRESETS:
        raise ValueError(f"data.dicom_window={mode!r} is not percentile, file or one of {sorted(WINDOW_PRESETS)}")
    return window(volume, *WINDOW_PRESETS[mode])


class DicomSliceDataset(ImageFileDataset):
    """The kept slices of DICOM ``series`` (uid -> files in order), as uint8 (3, H, W) images."""

    def __init__(self, series: Dict[str, List[str]], patient: Dict[str, str], classes: Sequence[str], root: str,
                 labels: Optional[Dict[str, int]] = None, *, window_mode: str = "percentile",
                 min_foreground: float = 0.05, slice_spacing_mm: float = 0.0, cache_mb: float = 512, transform=None):
        self.series, self.window_mode = series, window_mode
        self.min_foreground, self.slice_spacing_mm = float(min_foreground), float(slice_spacing_mm)
        self._cache = VolumeCache(cache_mb)
        self.skipped_files: List[Tuple[str, str]] = []
        samples, self.groups, self.slice_index = [], [], []  # slice_index[i] = (series uid, slice)
        items = series.items()
        if len(series) > 50:  # indexing decodes every series once
            from tqdm import tqdm

            items = tqdm(items, desc="indexing DICOM series", unit="series")
        for uid, paths in items:
            kept, n_slices = self._index_series(uid, paths)
            multi_frame = len(paths) == 1 and n_slices > 1
            for k in kept:
                name = f"{paths[0]}::frame={k}" if multi_frame else paths[k]
                samples.append((name, (labels or {}).get(uid, UNLABELED)))
                self.groups.append(patient.get(uid, uid))
                self.slice_index.append((uid, int(k)))
        super().__init__(samples, classes, root, transform)

    def _index_series(self, uid: str, paths: List[str]) -> Tuple[List[int], int]:
        """(the kept slices of one series: enough foreground, thinned by spacing; its slice count); ([], 0), named,
        when it is unreadable."""
        try:
            volume, datasets = read_series_headers(paths)
            self._cache.put(uid, windowed(volume, datasets[0], self.window_mode))  # decoded once, not on access
        except (DicomError, ValueError) as exc:  # named and counted; the other series go on
            self.skipped_files.append((paths[0], str(exc)))
            return [], 0
        slices = np.flatnonzero(foreground_mask(volume).mean(axis=(1, 2)) >= self.min_foreground)
        if self.slice_spacing_mm <= 0:
            return [int(k) for k in slices], volume.shape[0]
        positions = slice_positions(datasets, volume.shape[0])
        if positions is None:  # keep them all rather than guess a spacing
            warnings.warn(f"{paths[0]}: no ImagePositionPatient, SpacingBetweenSlices or SliceThickness, so "
                          f"data.slice_spacing_mm={self.slice_spacing_mm:g} cannot thin this series; every slice "
                          f"kept", RuntimeWarning, stacklevel=3)
            return [int(k) for k in slices], volume.shape[0]
        kept = spaced_indices([positions[k] for k in slices], self.slice_spacing_mm)
        return [int(slices[i]) for i in kept], volume.shape[0]

    def _windowed_series(self, uid: str) -> np.ndarray:
        return self._cache.get(uid, lambda: windowed(*read_series(self.series[uid]), self.window_mode))

    def load_image(self, index: int):
        uid, k = self.slice_index[index]
        try:
            image = self._windowed_series(uid)[k]
        except (DicomError, ValueError) as exc:
            sample = self.samples[index][0]
            if sample not in self._warned:
                self._warned.add(sample)
                warnings.warn(f"skipping unreadable slice {sample}: {exc}", RuntimeWarning, stacklevel=2)
            return None
        return torch.from_numpy(np.ascontiguousarray(np.repeat(image[None], 3, axis=0)))


def dicom_dataset(root: os.PathLike | str, cfg_data=None, transform=None, labelled: bool = True) -> DicomSliceDataset:
    """Every DICOM series under ``root``; class folders (``root/<class>/...``) give labels (unless
    ``labelled=False``: pretraining). Unreadable files are skipped, counted and named in one warning."""
    root = Path(root)
    files = dicom_files_under(root)
    if not files:
        raise FileNotFoundError(f"no DICOM files (.dcm, or files starting with the DICM preamble) under {root}")
    relative = {path: Path(path).relative_to(root).parts for path in files}
    labelled = labelled and all(len(parts) > 1 for parts in relative.values())  # root/<class>/[<series>/]<file>
    classes = sorted({parts[0] for parts in relative.values()}) if labelled else []
    label_of = {path: classes.index(parts[0]) for path, parts in relative.items()} if labelled else {}
    return dicom_files_dataset(files, classes, str(root), label_of, cfg_data, transform)


def dicom_files_dataset(files: Sequence[str], classes: Sequence[str], root: str, label_of: Dict[str, int],
                        cfg_data=None, transform=None) -> DicomSliceDataset:
    """The series of ``files``, each labelled by its first file's ``label_of`` entry (unlabeled when absent)."""
    series, patient, failed = group_series(files)
    labels = {uid: label_of[paths[0]] for uid, paths in series.items() if paths[0] in label_of}
    dataset = DicomSliceDataset(series, patient, classes, root, labels, transform=transform, **dicom_options(cfg_data))
    dataset.skipped_files = failed + dataset.skipped_files
    if dataset.skipped_files:
        shown = "; ".join(f"{p} ({why})" for p, why in dataset.skipped_files[:3])
        warnings.warn(f"skipped {len(dataset.skipped_files)} unreadable DICOM file(s): {shown}", RuntimeWarning)
    return dataset


def dicom_options(cfg_data) -> Dict[str, object]:
    """`DicomSliceDataset` keyword arguments from a config's data section (the defaults without one)."""
    if cfg_data is None:
        return {}
    return dict(window_mode=str(cfg_data.dicom_window), min_foreground=float(cfg_data.volume_min_foreground),
                slice_spacing_mm=float(cfg_data.slice_spacing_mm))
