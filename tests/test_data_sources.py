"""Mixed sources (data/sources.py): CSV manifests whose rows name NIfTI volumes, DICOM series folders and files
next to images, with a group column; and folders that mix 2D images with volumes. Every file is written here."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

nib = pytest.importorskip("nibabel")
pytest.importorskip("pydicom")

from pydicom.uid import generate_uid  # noqa: E402
from test_data_dicom import disc, write_slice  # noqa: E402
from test_data_volumes import NZ, pattern, save  # noqa: E402

from dinov2_repro.data.datasets import DatasetSubset  # noqa: E402
from dinov2_repro.data.sources import ConcatImageDataset, manifest_dataset  # noqa: E402
from dinov2_repro.data.volumes import split_slice_path  # noqa: E402
from dinov2_repro.eval.config import EvalDataConfig  # noqa: E402
from dinov2_repro.eval.splits import build_eval_splits  # noqa: E402

KEPT = NZ - 3  # slices with foreground in `pattern()`


def write_csv(path, rows, columns=("path", "label", "split", "group")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path


def test_a_csv_row_naming_a_volume_expands_into_its_slices_with_the_rows_label_and_group(tmp_path):
    save(pattern(), np.eye(4), tmp_path / "vols" / "a.nii.gz")
    save(pattern() * 2, np.eye(4), tmp_path / "vols" / "b.nii")
    series = generate_uid()
    for z in range(3):
        write_slice(tmp_path / "series" / f"{z}.dcm", disc(100 + z), series=series, position=float(z), patient="pX")
    write_slice(tmp_path / "single.dcm", disc(50), series=generate_uid(), patient="pY")
    png(tmp_path / "img.png", 90)
    manifest = write_csv(tmp_path / "m.csv", [("vols/a.nii.gz", "glioma", "train", "P1"),
                                              ("vols/b.nii", "normal", "train", ""),
                                              ("series", "normal", "test", "P3"),
                                              ("single.dcm", "glioma", "test", ""),
                                              ("img.png", "glioma", "train", "P1")])
    dataset = manifest_dataset(manifest)
    assert isinstance(dataset, ConcatImageDataset) and dataset.classes == ["glioma", "normal"]
    assert len(dataset) == 2 * KEPT + 3 + 1 + 1
    by_row = {}
    for (path, label), row, group in zip(dataset.samples, dataset.row_of, dataset.groups):
        by_row.setdefault(row, set()).add((dataset.classes[label], group))
    assert all(dataset.load_image(i) is not None for i in range(len(dataset)))
    last = DatasetSubset(dataset, [len(dataset) - 1, 0])  # a subset decodes through its dataset (volume slices)
    assert torch.equal(last.load_image(1), dataset.load_image(0)) and last.samples[1] == dataset.samples[0]
    # the group cell wins; an empty one falls back to the volume file or the DICOM PatientID
    assert by_row == {0: {("glioma", "P1")}, 1: {("normal", str(tmp_path / "vols" / "b.nii"))},
                      2: {("normal", "P3")}, 3: {("glioma", "pY")}, 4: {("glioma", "P1")}}
    slices = [split_slice_path(p)[1] for p, _ in dataset.samples if "a.nii.gz" in p]
    assert slices == list(range(2, NZ - 1))
    train_only = manifest_dataset(manifest, split="train")
    assert len(train_only) == 2 * KEPT + 1 and {train_only.rows[r]["split"] for r in train_only.row_of} == {"train"}


def test_a_csv_path_that_does_not_exist_or_is_no_known_kind_is_one_error_naming_it(tmp_path):
    save(pattern(), np.eye(4), tmp_path / "a.nii.gz")
    missing = write_csv(tmp_path / "m.csv", [("a.nii.gz", "x", "", ""), ("gone/b.nii.gz", "y", "", "")])
    with pytest.raises(FileNotFoundError, match=r"m\.csv: 1 path\(s\) in column 'path' do not exist, e\.g\. "
                                                r"\['.*gone/b\.nii\.gz'\]"):
        manifest_dataset(missing)
    (tmp_path / "notes.txt").write_text("hello")
    odd = write_csv(tmp_path / "odd.csv", [("a.nii.gz", "x", "", ""), ("notes.txt", "y", "", "")])
    with pytest.raises(ValueError, match=r"odd\.csv: .*notes\.txt in column 'path' is not an image, a NIfTI volume"):
        manifest_dataset(odd)
    twice = write_csv(tmp_path / "twice.csv", [("a.nii.gz", "x", "", ""), ("a.nii.gz", "y", "", "")])
    with pytest.raises(ValueError, match=r"a\.nii\.gz is named by more than one row"):
        manifest_dataset(twice)


def test_a_csv_of_nifti_volumes_trains_and_evaluates_and_keeps_each_group_on_one_side(tmp_path):
    import dinov2_repro
    from dinov2_repro.train.engine import train
    from test_engine_common import tiny_cfg
    from test_eval_cli import TINY as TINY_SPEC

    rows = []
    for label, scale in (("bright", 3.0), ("dim", 1.0)):
        for s in range(4):  # 4 subjects per class; subjects 0 and 1 of a class are one patient (two scans)
            path = save(pattern() * scale + s, np.eye(4), tmp_path / "v" / f"{label}{s}.nii.gz")
            rows.append((path, label, "train" if s < 3 else "test", f"{label}-patient{0 if s < 2 else s}"))
    manifest = write_csv(tmp_path / "volumes.csv", rows)
    splits = build_eval_splits(manifest, EvalDataConfig(val_fraction=0.3, group_regex=r"(\w+)\.nii"))
    sides = {}
    for name in ("train", "val", "test"):
        for path, _ in getattr(splits, name).samples:
            sides.setdefault(splits.groups[path], set()).add(name)
    assert set(sides) == {f"{c}-patient{i}" for c in ("bright", "dim") for i in (0, 2, 3)}  # the column, not the regex
    assert all(len(names) == 1 for names in sides.values()), sides
    for c in ("bright", "dim"):  # two training groups per class: one held out for validation, one kept
        assert sorted(sides[f"{c}-patient{i}"].pop() for i in (0, 2)) == ["train", "val"]
    assert splits.split_groups()["test"] == ["bright-patient3", "dim-patient3"]

    cfg = tiny_cfg(f"data.path={manifest}", "data.kind=auto", "train.max_iterations=1", "data.augmentation=mri",
                   "data.intensity_jitter=false")
    assert train(cfg, tmp_path / "run")["iterations"] == 1
    assert f"data: csv at {manifest}: {8 * KEPT} images" in (tmp_path / "run" / "train.log").read_text()
    result = dinov2_repro.evaluate("knn", TINY_SPEC, manifest, output_dir=tmp_path / "knn",
                                   overrides=["progress=false", "data.num_workers=0", "data.dedup_test=false"])
    assert result["runs"][0]["test"]["n_samples"] == 2 * KEPT  # every test slice decoded and scored
    report = (tmp_path / "knn" / "report.md").read_text()
    assert "- test (2): `bright-patient3`, `dim-patient3`" in report


def write_mixed_folder(root):
    """class a: 2 PNGs and one NIfTI volume; class b: 1 PNG and a DICOM series of 3 slices."""
    for i in range(2):
        png(root / "a" / f"{i}.png", 40 + i)
    save(pattern(), np.eye(4), root / "a" / "subject1" / "t1.nii.gz")
    png(root / "b" / "0.png", 200)
    series = generate_uid()
    for z in range(3):
        write_slice(root / "b" / "scan" / f"{z}.dcm", disc(300 + z), series=series, position=float(z), patient="q")


def test_a_folder_mixing_images_and_volumes_is_read_whole_for_pretraining_evaluation_and_inspect(tmp_path, capsys):
    from dinov2_repro.data.cli import main as data_main
    from dinov2_repro.data.loaders import build_image_dataset, resolve_data_kind

    write_mixed_folder(tmp_path / "mix")
    assert resolve_data_kind(str(tmp_path / "mix")) == "mixed"
    unlabelled = build_image_dataset(str(tmp_path / "mix"), "auto", labelled=False)  # what pretraining reads
    assert len(unlabelled) == 3 + KEPT + 3 and unlabelled.classes == [] and set(unlabelled.targets) == {-1}
    assert all(unlabelled.load_image(i) is not None for i in range(len(unlabelled)))
    labelled = build_image_dataset(str(tmp_path / "mix"), "auto")
    per_class = {c: sum(1 for _, y in labelled.samples if labelled.classes[y] == c) for c in labelled.classes}
    assert per_class == {"a": 2 + KEPT, "b": 1 + 3}

    splits = build_eval_splits(tmp_path / "mix", EvalDataConfig(test_fraction=0.4, val_fraction=0.3))
    assert sum(len(getattr(splits, n)) for n in ("train", "val", "test")) == 3 + KEPT + 3
    volume_sides = {n for n in ("train", "val", "test") for p, _ in getattr(splits, n).samples if "t1.nii.gz" in p}
    assert len(volume_sides) == 1  # the volume's slices stay together
    assert all(getattr(splits, n).load_image(0) is not None for n in ("train", "val", "test"))

    assert data_main(["inspect", "--data", str(tmp_path / "mix"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"kinds: 2D images 3, NIfTI slices {KEPT}, DICOM slices 3" in out
    assert f"per class: a {2 + KEPT}, b 4" in out and "unreadable on decoding: 0" in out
