"""Real files that the tests did not make: the public test collections shipped inside pydicom and nibabel, read
with the right geometry and intensities (no download: they are part of the installed packages)."""

import os

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402
from nibabel.testing import data_path  # noqa: E402

from dinov2_repro.data.dicom import read_frames, read_series  # noqa: E402
from dinov2_repro.data.volumes import read_nifti  # noqa: E402


def test_ct_small_is_in_hounsfield_units():
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)  # stored values; slope 1, intercept -1024
    frames, ds = read_frames(path)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert frames.shape == (1, 128, 128)
    np.testing.assert_array_equal(frames[0], raw - 1024)


def test_mr_small_reads_the_same_from_its_jpeg2000_lossless_copy():
    plain, _ = read_series([get_testdata_file("MR_small.dcm")])
    compressed, _ = read_series([get_testdata_file("MR_small_jp2klossless.dcm")])  # the dicom extra decodes it
    np.testing.assert_array_equal(plain, compressed)


def test_nifti_files_come_out_in_ras_orientation():
    # anatomical.nii is stored LAS: the canonical (RAS) volume is its data with the first axis reversed
    path = os.path.join(data_path, "anatomical.nii")
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    (volume,) = read_nifti(path)
    np.testing.assert_array_equal(volume, np.asarray(image.dataobj, dtype=np.float32)[::-1])
    # example4d.nii.gz: two LAS volumes
    path = os.path.join(data_path, "example4d.nii.gz")
    raw = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    volumes = read_nifti(path, -1)
    assert len(volumes) == 2 and volumes[0].shape == (128, 96, 24)
    for t in range(2):
        np.testing.assert_array_equal(volumes[t], raw[::-1, :, :, t])
    np.testing.assert_array_equal(read_nifti(path, 1)[0], volumes[1])
