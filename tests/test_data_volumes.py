"""NIfTI volumes as slices (data/volumes.py), on volumes written here with nibabel: orientation, slice order,
normalisation, background skipping, 2.5D channels, 4D volumes, unreadable files, and a short pretraining."""

import json

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from dinov2_repro.data.datasets import image_list_sha1  # noqa: E402
from dinov2_repro.data.volumes import (VolumeSliceDataset, normalise_volume, oriented_slice,  # noqa: E402
                                       split_slice_path, volume_dataset)

NX, NY, NZ = 12, 10, 9


def pattern() -> np.ndarray:
    """A RAS+ volume whose every voxel is distinct and tells its position: 1 + x + 20 y + 400 z, with the 2 lowest
    and the top axial slices empty (background)."""
    x, y, z = np.meshgrid(np.arange(NX), np.arange(NY), np.arange(NZ), indexing="ij")
    volume = (1 + x + 20 * y + 400 * z).astype(np.float32)
    volume[:, :, :2] = 0
    volume[:, :, -1] = 0
    return volume


def save(volume: np.ndarray, affine: np.ndarray, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return str(path)


def non_canonical_copy(volume: np.ndarray, path) -> str:
    """The same anatomy stored as (z, y, x) with x flipped: voxel (i, j, k) is at world (NX-1-k, j, i)."""
    stored = volume.transpose(2, 1, 0)[:, :, ::-1].copy()
    affine = np.array([[0, 0, -1, NX - 1], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    return save(stored, affine, path)


def test_slices_are_the_same_whatever_the_files_axis_order_and_flips(tmp_path):
    volume = pattern()
    canonical = save(volume, np.eye(4), tmp_path / "a" / "canonical.nii.gz")
    other = non_canonical_copy(volume, tmp_path / "b" / "other.nii")
    a = VolumeSliceDataset([canonical], [], str(tmp_path), min_foreground=0.05)
    b = VolumeSliceDataset([other], [], str(tmp_path), min_foreground=0.05)
    assert [split_slice_path(p)[1] for p, _ in a.samples] == list(range(2, NZ - 1))  # background skipped, in order
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a.load_image(i), b.load_image(i)), a.samples[i][0]
    # orientation of a slice: anterior (high y) at the top, x running left to right
    raw = oriented_slice(volume, 2, 4)
    assert raw.shape == (NY, NX) and raw[0, 0] == 1 + 0 + 20 * (NY - 1) + 400 * 4 and raw[-1, -1] == 1 + (NX - 1) + 1600
    image = a.load_image(2)  # slice z = 4
    assert image.shape == (3, NY, NX) and image.dtype == torch.uint8
    assert image[0, 0, 0] < image[0, 0, -1] and image[0, 0, 0] > image[0, -1, 0]  # brighter with x, and with y


def test_robust_normalisation_maps_foreground_percentiles_to_0_and_255():
    volume = np.zeros((4, 4, 10), np.float32)
    volume[..., 2:] = np.arange(100, 228, dtype=np.float32).reshape(4, 4, 8)  # foreground 100..227, background 0
    out = normalise_volume(volume, percentiles=(0, 100))  # the foreground's min and max
    assert out[..., :2].max() == 0 and out.max() == 255
    foreground = volume[..., 2:]
    expected = np.clip((foreground - 100) / 127 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(out[..., 2:], expected)
    clipped = normalise_volume(volume)  # default 0.5 / 99.5: the extremes clip
    assert clipped[..., 2:].min() == 0 and clipped.max() == 255


def test_two_and_a_half_d_stacks_the_slices_below_at_and_above(tmp_path):
    path = save(pattern(), np.eye(4), tmp_path / "v.nii.gz")
    flat = VolumeSliceDataset([path], [], str(tmp_path))
    stacked = VolumeSliceDataset([path], [], str(tmp_path), two_and_a_half_d=True)
    index = [split_slice_path(p)[1] for p, _ in stacked.samples].index(5)
    image = stacked.load_image(index).int()
    assert (image[0] < image[1]).all() and (image[1] < image[2]).all()  # z - 1, z, z + 1: intensity grows with z
    centre = [split_slice_path(p)[1] for p, _ in flat.samples].index(5)
    assert torch.equal(image[1].to(torch.uint8), flat.load_image(centre)[0])


def test_4d_volumes_one_index_or_each(tmp_path):
    volume = pattern()
    path = save(np.stack([volume, volume * 2], axis=3), np.eye(4), tmp_path / "fmri.nii.gz")
    one = VolumeSliceDataset([path], [], str(tmp_path), volume_index=1)
    each = VolumeSliceDataset([path], [], str(tmp_path), volume_index=-1)
    assert len(each) == 2 * len(one) and each.samples[-1][0].endswith(",t=1")
    assert torch.equal(one.load_image(0), each.load_image(len(one)))  # volume 1, first kept slice
    with pytest.raises(ValueError, match="holds 2 volumes"):
        from dinov2_repro.data.volumes import read_nifti

        read_nifti(path, 5)


def test_class_folders_label_volumes_and_a_broken_file_is_skipped_and_named(tmp_path):
    for label in ("glioma", "normal"):
        save(pattern(), np.eye(4), tmp_path / label / "patient1" / "t1.nii.gz")
    broken = tmp_path / "normal" / "patient2" / "t1.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x1f\x8b not a volume")
    with pytest.warns(RuntimeWarning, match=r"skipped 1 unreadable volume\(s\): .*patient2/t1.nii.gz"):
        dataset = volume_dataset(tmp_path)
    assert dataset.classes == ["glioma", "normal"] and len(dataset) == 2 * (NZ - 3)
    assert sorted({y for _, y in dataset.samples}) == [0, 1]
    assert len(set(dataset.groups)) == 2 and all(g.endswith("t1.nii.gz") for g in dataset.groups)
    assert dataset.skipped_volumes[0][0] == str(broken)


def test_the_feature_cache_key_follows_the_volume_file(tmp_path):
    path = save(pattern(), np.eye(4), tmp_path / "v.nii.gz")
    dataset = VolumeSliceDataset([path], [], str(tmp_path))
    before = image_list_sha1(dataset.samples)
    save(pattern() * 2, np.eye(4), tmp_path / "v.nii.gz")
    import os

    os.utime(path, ns=(1, 1))  # a different modification time as well
    assert image_list_sha1(dataset.samples) != before


def test_pretraining_reads_a_folder_of_volumes(tmp_path):
    from dinov2_repro.train.engine import train
    from test_engine_common import tiny_cfg

    for i in range(3):
        save(pattern() + i, np.eye(4), tmp_path / "data" / f"subject{i}" / "t1.nii.gz")
    cfg = tiny_cfg(f"data.path={tmp_path / 'data'}", "data.kind=auto", "train.max_iterations=2",
                   "data.augmentation=mri", "data.intensity_jitter=false")
    summary = train(cfg, tmp_path / "run")
    assert summary["iterations"] == 2 and summary["skipped_files"]["count"] == 0
    log_text = (tmp_path / "run" / "train.log").read_text()
    assert f"data: nifti at {tmp_path / 'data'}: {3 * (NZ - 3)} images, unlabeled" in log_text
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iterations"] == 2


def test_evaluation_reads_volumes_and_holds_out_whole_volumes(tmp_path):
    import dinov2_repro
    from test_eval_cli import TINY as TINY_SPEC

    for split, subjects in (("Training", 3), ("Testing", 1)):
        for label, scale in (("bright", 3.0), ("dim", 1.0)):
            for s in range(subjects):
                save(pattern() * scale + s, np.eye(4), tmp_path / "mri" / split / label / f"{split}{s}" / "t1.nii.gz")
    result = dinov2_repro.evaluate("knn", TINY_SPEC, tmp_path / "mri", output_dir=tmp_path / "knn",
                                   overrides=["progress=false", "data.num_workers=0", "data.dedup_test=false"])
    notes = result["data"]["notes"]
    assert any("groups (patients or volumes) per split: train 4, val 2, test 2" in n for n in notes), notes
    assert "by whole groups" in result["data"]["source"]["val"]
    counts = result["data"]["counts"]
    assert sum(counts["test"].values()) == 2 * (NZ - 3) and sum(counts["val"].values()) == 2 * (NZ - 3)
    assert result["runs"][0]["test"]["n_samples"] == 2 * (NZ - 3)  # every test slice decoded and scored


def test_volume_cache_evicts_least_recently_used_and_indexing_fills_it(tmp_path, monkeypatch):
    from dinov2_repro.data import volumes as volumes_module
    from dinov2_repro.data.volumes import VolumeCache

    cache = VolumeCache(megabytes=2.5 / 1024)  # 2,560 bytes: two 1,024-byte arrays fit, three do not
    for key in "abc":
        cache.put(key, np.zeros(1024, np.uint8))
        if key == "b":
            cache.get("a", lambda: None)  # "a" becomes the most recent
    assert list(cache.items) == ["a", "c"] and cache.nbytes == 2048
    path = save(pattern(), np.eye(4), tmp_path / "v.nii.gz")
    dataset = VolumeSliceDataset([path], [], str(tmp_path))
    monkeypatch.setattr(volumes_module, "read_nifti", lambda *a, **k: pytest.fail("volume read twice"))
    assert dataset.load_image(0) is not None  # served from what indexing already decoded


def test_slice_spacing_keeps_slices_at_least_that_far_apart_along_the_reoriented_axis(tmp_path):
    from types import SimpleNamespace

    full = np.zeros((6, 6, 10), np.float32)
    full[1:5, 1:5, :] = 100.0  # every axial slice has foreground (16 of 36 voxels)
    one_mm = save(full, np.eye(4), tmp_path / "a" / "iso.nii.gz")
    dataset = VolumeSliceDataset([one_mm], [], str(tmp_path), slice_spacing_mm=3.0)
    assert [split_slice_path(p)[1] for p, _ in dataset.samples] == [0, 3, 6, 9]  # 1 mm apart: every third
    two_mm = save(full, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "b" / "z2.nii.gz")
    dataset = VolumeSliceDataset([two_mm], [], str(tmp_path), slice_spacing_mm=3.0)
    assert [split_slice_path(p)[1] for p, _ in dataset.samples] == [0, 2, 4, 6, 8]  # 2 mm: 4 mm apart, not 2
    # stored (z, y, x): the file's third axis is x at 3 mm, its first is z (axial) at 1 mm
    stored = full.transpose(2, 1, 0).copy()
    affine = np.array([[0, 0, 3, 0], [0, 3, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    swapped = save(stored, affine, tmp_path / "c" / "zyx.nii.gz")
    dataset = VolumeSliceDataset([swapped], [], str(tmp_path), slice_spacing_mm=3.0)
    assert [split_slice_path(p)[1] for p, _ in dataset.samples] == [0, 3, 6, 9]
    # through the config key, and only among the slices with foreground (2..7 in the pattern)
    cfg = SimpleNamespace(volume_axis="axial", volume_min_foreground=0.05, volume_25d=False, volume_index=0,
                          slice_spacing_mm=3.0)
    save(pattern(), np.eye(4), tmp_path / "d" / "p.nii.gz")
    assert [split_slice_path(p)[1] for p, _ in volume_dataset(tmp_path / "d", cfg).samples] == [2, 5]
    cfg.slice_spacing_mm = 0.0
    assert len(volume_dataset(tmp_path / "d", cfg)) == NZ - 3  # 0 = off
