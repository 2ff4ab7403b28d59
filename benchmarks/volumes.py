"""Slices per second from NIfTI volumes and from DICOM series into the multi-crop pipeline (one process).

Writes synthetic volumes into a temporary folder (a bright ellipsoid with noise on a dark background; NIfTI as
.nii.gz, DICOM as one uncompressed 16-bit file per slice), then times:
- indexing: reading every volume once to find the slices with foreground;
- slices/s: `MultiCropDataset` items (decode from the per-process volume cache, normalise or window, then the
  preset's multi-crop augmentation), visiting the slices in a shuffled order, as the sampler does.

    python benchmarks/volumes.py --volumes 8 --size 192 --slices 64 --items 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def phantom(size: int, slices: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.linspace(-1, 1, slices), np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                          indexing="ij")
    inside = (x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 <= 1
    return np.clip(np.where(inside, 800, 20) + rng.normal(0, 30, inside.shape), 0, 4000).astype(np.uint16)


def write_nifti(folder: Path, volumes) -> None:
    import nibabel as nib

    for i, volume in enumerate(volumes):
        (folder / f"s{i}").mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.float32), np.eye(4)),
                 str(folder / f"s{i}" / "t1.nii.gz"))


def write_dicom(folder: Path, volumes) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for i, volume in enumerate(volumes):
        series = generate_uid()
        (folder / f"s{i}").mkdir(parents=True)
        for k, pixels in enumerate(volume):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta, ds.SeriesInstanceUID, ds.PatientID, ds.InstanceNumber = meta, series, f"p{i}", k + 1
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(k)]
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *pixels.shape, 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = pixels.tobytes()
            ds.save_as(str(folder / f"s{i}" / f"{k:04d}.dcm"), enforce_file_format=True)


def measure(kind: str, root: Path, cfg, items: int) -> dict:
    import torch

    from dinov2_repro.data.loaders import MultiCropDataset, build_image_dataset
    from dinov2_repro.data.augmentations import build_multicrop_augmentation

    torch.set_num_threads(1)
    start = time.perf_counter()
    images = build_image_dataset(str(root), kind, data_cfg=cfg.data, labelled=False)
    indexing = time.perf_counter() - start
    dataset = MultiCropDataset(images, build_multicrop_augmentation(cfg), seed=0)
    order = np.random.default_rng(0).permutation(len(dataset))[:items]
    dataset[(int(order[0]), 0)]  # one untimed item: the augmentation's first call pays one-off set-up costs
    start = time.perf_counter()
    for position, index in enumerate(order):
        assert dataset[(int(index), position)]["crops"] is not None
    seconds = time.perf_counter() - start
    return dict(kind=kind, volumes=len(set(getattr(images, "groups", []))), slices_kept=len(images),
                indexing_s=round(indexing, 2), items=len(order), slices_per_s=round(len(order) / seconds, 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--preset", default="vits14_brain_mri", help="whose crops and augmentation are timed")
    args = parser.parse_args(argv)

    from dinov2_repro.config import load_config

    volumes = [phantom(args.size, args.slices, seed) for seed in range(args.volumes)]  # (slices, H, W)
    cfg = load_config(args.preset, ["data.augmentation=mri", "data.intensity_jitter=true"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, writer in (("nifti", write_nifti), ("dicom", write_dicom)):
            root = Path(tmp) / kind
            writer(root, volumes)
            results.append(measure(kind, root, cfg, args.items))
    print(json.dumps(dict(results=results, volume_shape=[args.slices, args.size, args.size], preset=args.preset,
                          crops=[int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size),
                                 int(cfg.crops.local_crops_number)],
                          machine=platform.machine(), python=platform.python_version()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
