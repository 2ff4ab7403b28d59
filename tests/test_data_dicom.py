"""DICOM series as slices (data/dicom.py), on files written here with pydicom: slice order from positions (and the
InstanceNumber fallback), rescale and window arithmetic, MONOCHROME1, multi-frame files, an undecodable transfer
syntax, patient groups, and a short pretraining on a folder of series."""

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from dinov2_repro.data.dicom import (WINDOW_PRESETS, dicom_dataset, group_series, read_series,  # noqa: E402
                                     window, windowed)

H = W = 8


def write_slice(path, pixels, *, series, patient="p1", position=None, instance=1, photometric="MONOCHROME2",
                slope=1.0, intercept=0.0, window_center=None, window_width=None, syntax=ExplicitVRLittleEndian,
                frames=1):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.PatientID, ds.InstanceNumber = series, patient, instance
    ds.Rows, ds.Columns, ds.SamplesPerPixel = H, W, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = photometric
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if position is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # axial: the normal is +z
        ds.ImagePositionPatient = [0, 0, position]
    if window_center is not None:
        ds.WindowCenter, ds.WindowWidth = window_center, window_width
    if frames > 1:
        ds.NumberOfFrames = frames
    raw = np.asarray(pixels, dtype=np.uint16).tobytes()
    if syntax.is_compressed:  # not a real codestream: what a file no installed decoder can read looks like
        from pydicom.encaps import encapsulate

        raw = encapsulate([raw])
    ds.PixelData = raw
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def disc(level: float) -> np.ndarray:
    """A bright disc of value ``level`` on a zero background (enough foreground to be kept)."""
    y, x = np.mgrid[:H, :W]
    return np.where((y - 3.5) ** 2 + (x - 3.5) ** 2 <= 9, level, 0).astype(np.uint16)


def test_slices_follow_the_patient_position_not_the_file_names_or_instance_numbers(tmp_path):
    series = generate_uid()
    positions = [3.0, 1.0, 4.0, 0.0, 2.0]
    for i, (z, instance) in enumerate(zip(positions, [2, 5, 1, 4, 3])):
        write_slice(tmp_path / "s" / f"f{i}.dcm", disc(100 + 100 * z), series=series, position=z, instance=instance)
    ordered, patient, failed = group_series(sorted(str(p) for p in (tmp_path / "s").iterdir()))
    assert failed == [] and patient == {series: "p1"}
    volume, _ = read_series(ordered[series])
    assert volume[:, 3, 3].tolist() == [100, 200, 300, 400, 500]  # z = 0, 1, 2, 3, 4
    # without positions, InstanceNumber orders the slices
    other = generate_uid()
    for i, instance in enumerate([3, 1, 2]):
        write_slice(tmp_path / "n" / f"g{i}.dcm", disc(10 * instance), series=other, instance=instance)
    ordered, _, _ = group_series(sorted(str(p) for p in (tmp_path / "n").iterdir()))
    assert read_series(ordered[other])[0][:, 3, 3].tolist() == [10, 20, 30]


def test_rescale_window_and_monochrome1_arithmetic(tmp_path):
    stored = disc(1064)  # x 1 - 1024 -> 40 HU in the disc, -1024 outside
    path = write_slice(tmp_path / "ct.dcm", stored, series=generate_uid(), intercept=-1024.0, window_center=40,
                       window_width=80)
    volume, ds = read_series([path])
    assert volume[0, 3, 3] == 40 and volume[0, 0, 0] == -1024
    image = windowed(volume, ds, "file")  # [0, 80] -> [0, 255]: 40 is mid-grey, -1024 black
    assert image[0, 3, 3] == 128 and image[0, 0, 0] == 0
    assert np.array_equal(windowed(volume, ds, "brain"), image)  # the brain preset is the same window
    assert window(np.array([0.0, 40.0, 80.0, 200.0]), 40, 80).tolist() == [0, 128, 255, 255]
    inverted = write_slice(tmp_path / "m1.dcm", stored, series=generate_uid(), photometric="MONOCHROME1")
    plain = write_slice(tmp_path / "m2.dcm", stored, series=generate_uid())
    a, b = read_series([inverted])[0], read_series([plain])[0]
    assert np.array_equal(a, b.max() + b.min() - b)  # bright stored values show dark in MONOCHROME1
    assert set(WINDOW_PRESETS) == {"brain", "subdural", "bone", "soft_tissue", "lung"}


def test_multi_frame_files_undecodable_files_and_patient_groups(tmp_path):
    frames = np.stack([disc(100), disc(200), disc(300)])
    write_slice(tmp_path / "mf" / "cine.dcm", frames, series=generate_uid(), patient="p2", frames=3)
    series = generate_uid()
    for z in range(2):
        write_slice(tmp_path / "ax" / f"{z}.dcm", disc(50 + z), series=series, position=float(z), patient="p1")
    broken = write_slice(tmp_path / "bad" / "j2k.dcm", disc(1), series=generate_uid(), syntax=JPEG2000Lossless)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable DICOM file\(s\): .*j2k\.dcm .*JPEG 2000"):
        dataset = dicom_dataset(tmp_path)
    names = [p for p, _ in dataset.samples]
    assert len(dataset) == 5 and sum("::frame=" in n for n in names) == 3
    assert sorted(set(dataset.groups)) == ["p1", "p2"] and dataset.skipped_files[0][0] == broken
    image = dataset.load_image(names.index(f"{tmp_path / 'mf' / 'cine.dcm'}::frame=2"))
    assert image.shape == (3, H, W) and image.dtype == torch.uint8 and image[0, 3, 3] == 255


def test_pretraining_reads_a_folder_of_dicom_series(tmp_path):
    from dinov2_repro.train.engine import train
    from test_engine_common import tiny_cfg

    for subject in range(3):
        series = generate_uid()
        for z in range(4):
            write_slice(tmp_path / "data" / f"subject{subject}" / f"{z}.dcm", disc(100 + 50 * z + subject),
                        series=series, position=float(z), patient=f"p{subject}")
    cfg = tiny_cfg(f"data.path={tmp_path / 'data'}", "data.kind=auto", "train.max_iterations=2",
                   "data.augmentation=mri", "data.intensity_jitter=false")
    summary = train(cfg, tmp_path / "run")
    assert summary["iterations"] == 2 and summary["skipped_files"]["count"] == 0
    assert f"data: dicom at {tmp_path / 'data'}: 12 images, unlabeled" in (tmp_path / "run" / "train.log").read_text()


def test_a_patient_with_series_in_training_and_test_is_a_leak(tmp_path):
    from dinov2_repro.eval.config import EvalDataConfig
    from dinov2_repro.eval.splits import build_eval_splits

    for split, patient in (("Training", "p1"), ("Training", "p2"), ("Testing", "p1")):
        series = generate_uid()
        for z in range(2):
            write_slice(tmp_path / "d" / split / "glioma" / f"{patient}_{split}" / f"{z}.dcm", disc(100 + z),
                        series=series, position=float(z), patient=patient)
    cfg = EvalDataConfig(val_fraction=0.5)
    with pytest.raises(ValueError, match=r"1 group\(s\) are in the test split and in training or validation, "
                                         r"e\.g\. \['p1'\]"):
        build_eval_splits(tmp_path / "d", cfg)


def test_single_slice_files_directly_in_class_folders_are_labelled(tmp_path):
    for label, level in (("a", 100), ("b", 300)):
        for i in range(2):
            write_slice(tmp_path / label / f"{i}.dcm", disc(level), series=generate_uid(), patient=f"{label}{i}")
    dataset = dicom_dataset(tmp_path)
    assert dataset.classes == ["a", "b"] and sorted(y for _, y in dataset.samples) == [0, 0, 1, 1]
    assert len(set(dataset.groups)) == 4


def test_slice_spacing_thins_a_series_by_its_positions(tmp_path):
    from dinov2_repro.data.dicom import DicomSliceDataset

    series, positions = generate_uid(), [5.0, 0.0, 2.5, 1.0, 6.0, 3.0]  # irregular, files in shuffled order
    for i, z in enumerate(positions):
        write_slice(tmp_path / "s" / f"{i}.dcm", disc(100 + 10 * z), series=series, position=z, instance=6 - i)
    ordered, patient, _ = group_series(sorted(str(p) for p in (tmp_path / "s").iterdir()))
    kept = DicomSliceDataset(ordered, patient, [], str(tmp_path), slice_spacing_mm=2.0)
    # sorted positions 0, 1, 2.5, 3, 5, 6: from 0, the next at >= 2 mm is 2.5, then 5
    assert [k for _, k in kept.slice_index] == [0, 2, 4]
    assert [positions[int(p.rsplit("/", 1)[1][:-4])] for p, _ in kept.samples] == [0.0, 2.5, 5.0]
    everything = DicomSliceDataset(ordered, patient, [], str(tmp_path))
    assert len(everything) == 6
    unplaced = generate_uid()
    for i in range(3):
        write_slice(tmp_path / "u" / f"{i}.dcm", disc(100), series=unplaced, instance=i + 1)
    ordered, patient, _ = group_series(sorted(str(p) for p in (tmp_path / "u").iterdir()))
    with pytest.warns(RuntimeWarning, match=r"0\.dcm: no ImagePositionPatient.*slice_spacing_mm=2 cannot thin"):
        assert len(DicomSliceDataset(ordered, patient, [], str(tmp_path), slice_spacing_mm=2.0)) == 3
