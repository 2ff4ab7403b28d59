"""Class-folder / Kaggle / unlabeled / CSV datasets, corrupt files, clear errors, stratified splits."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.datasets import (ClassFolderDataset, CsvDataset, DatasetSubset, UnlabeledFolderDataset,
                                        open_labeled_dataset, stratified_split, stratified_subset)

KAGGLE = ("glioma", "meningioma", "notumor", "pituitary")


def _img(path, value=100, size=(6, 5), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def _kaggle(root, n_train=(3, 2, 4, 1), n_test=(1, 1, 1, 1)):
    for split, counts in (("Training", n_train), ("Testing", n_test)):
        for cls, n in zip(KAGGLE, counts):
            for i in range(n):
                _img(root / split / cls / f"{cls[:2]}_{i}.jpg", value=10 * KAGGLE.index(cls))
    return root


def test_kaggle_layout_split_by_name(tmp_path):
    root = _kaggle(tmp_path / "brain")
    train = ClassFolderDataset(root, split="Training")
    test = ClassFolderDataset(root, split="testing")  # split names match case-insensitively
    assert train.classes == list(KAGGLE) and test.classes == list(KAGGLE)
    assert len(train) == 10 and len(test) == 4
    assert train.targets == [0] * 3 + [1] * 2 + [2] * 4 + [3]
    image, label = train[3]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape == (3, 5, 6)
    assert label == 1 and int(image[0, 0, 0]) == 10
    assert all(p.startswith(str(root / "Training")) for p, _ in train.samples)
    with pytest.raises(FileNotFoundError, match="Validation.*Testing.*Training"):
        ClassFolderDataset(root, split="Validation")
    # the split folder itself, or a plain class folder, also work
    assert len(open_labeled_dataset(root / "Training", split="Training")) == 10
    assert len(open_labeled_dataset(root / "Testing")) == 4
    with pytest.raises(ValueError, match="split"):
        open_labeled_dataset(root)  # Training + Testing would be mixed


def test_imagefolder_conventions(tmp_path):
    root = tmp_path / "cf"
    _img(root / "b_class" / "x.PNG")
    _img(root / "b_class" / "sub" / "y.JpEg", mode="RGB")  # nested, odd case
    _img(root / "a_class" / "z.tif")
    _img(root / "a_class" / "w.bmp")
    (root / "a_class" / "notes.txt").write_text("not an image")
    _img(root / ".ipynb_checkpoints" / "q.png")  # hidden folders are not classes
    _img(root / "a_class" / ".cache" / "hidden.png")  # nor searched for images
    ds = ClassFolderDataset(root)
    assert ds.classes == ["a_class", "b_class"] and ds.class_to_idx == {"a_class": 0, "b_class": 1}
    assert [p.split("/")[-1] for p, _ in ds.samples] == ["w.bmp", "z.tif", "x.PNG", "y.JpEg"]
    assert ds.targets == [0, 0, 1, 1]
    assert all(ds[i][0].shape == (3, 5, 6) for i in range(len(ds)))
    pil_ds = ClassFolderDataset(root, image_format="pil")
    assert pil_ds[0][0].mode == "RGB" and pil_ds[0][0].size == (6, 5)


def test_clear_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_root"):
        ClassFolderDataset(tmp_path / "missing_root")
    empty_class = tmp_path / "ec"
    _img(empty_class / "full" / "a.png")
    (empty_class / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ec/empty"):
        ClassFolderDataset(empty_class)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing"):
        UnlabeledFolderDataset(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ClassFolderDataset(tmp_path / "nothing")


def test_unlabeled_folder_is_recursive_with_label_minus_one(tmp_path):
    _img(tmp_path / "u" / "a.png")
    _img(tmp_path / "u" / "deep" / "deeper" / "b.jpg")
    ds = UnlabeledFolderDataset(tmp_path / "u")
    assert len(ds) == 2 and ds.targets == [-1, -1] and ds.classes == []
    assert ds[1][1] == -1


def test_corrupt_file_returns_none_and_warns_once(tmp_path):
    _img(tmp_path / "c" / "cls" / "good.png")
    bad = tmp_path / "c" / "cls" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ds = ClassFolderDataset(tmp_path / "c")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.warns(RuntimeWarning, match="bad.jpg"):
        assert ds[index] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second access must not warn again
        assert ds[index] is None
        assert ds[1 - index] is not None


def test_csv_manifest(tmp_path):
    _img(tmp_path / "imgs" / "a.png", 1)
    _img(tmp_path / "imgs" / "b.png", 2)
    absolute = _img(tmp_path / "elsewhere" / "c.png", 3)
    csv_path = tmp_path / "meta" / "manifest.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("path,label,split\n../imgs/a.png,tumor,train\n../imgs/b.png,healthy,train\n"
                        f"{absolute},tumor,test\n")
    ds = CsvDataset(csv_path)
    assert ds.classes == ["healthy", "tumor"] and ds.targets == [1, 0, 1]
    assert int(ds[0][0][0, 0, 0]) == 1 and ds[2][1] == 1
    train = CsvDataset(csv_path, split="train")
    assert len(train) == 2 and int(train[1][0][0, 0, 0]) == 2
    assert len(open_labeled_dataset(csv_path, split="test")) == 1
    with pytest.raises(ValueError, match=r"manifest.csv.*'split'.*'val'"):
        CsvDataset(csv_path, split="val")

    ints = tmp_path / "ints.csv"
    ints.write_text("path,label\nimgs/a.png,2\nimgs/b.png,0\nimgs/a.png,\n")
    ds = CsvDataset(ints)
    assert ds.targets == [2, 0, -1] and ds.classes == ["0", "1", "2"]

    unlabeled = tmp_path / "unl.csv"
    unlabeled.write_text("path\nimgs/a.png\n")
    assert CsvDataset(unlabeled).targets == [-1]
    with pytest.raises(ValueError, match=r"unl.csv.*'split' is missing"):
        CsvDataset(unlabeled, split="train")


def test_csv_errors_name_file_and_column(tmp_path):
    no_path = tmp_path / "nopath.csv"
    no_path.write_text("file,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"nopath.csv.*'path'"):
        CsvDataset(no_path)
    missing = tmp_path / "missing.csv"
    missing.write_text("path\nghost.png\n")
    with pytest.raises(FileNotFoundError, match=r"missing.csv.*ghost.png"):
        CsvDataset(missing)
    _img(tmp_path / "a.png")
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("path,label\na.png,1\na.png,cat\n")
    with pytest.raises(ValueError, match=r"mixed.csv.*'label'"):
        CsvDataset(mixed)
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        CsvDataset(tmp_path / "absent.csv")


def test_stratified_split_keeps_proportions_and_is_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 2)
    train, val = stratified_split(labels, 0.2, seed=1)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert [int((labels[val] == c).sum()) for c in range(4)] == [10, 6, 4, 1]  # round(0.2 n), >= 1 each
    again, _ = stratified_split(labels, 0.2, seed=1)
    other, _ = stratified_split(labels, 0.2, seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0)


def test_stratified_subset_keeps_each_class_and_nests():
    labels = np.array([0] * 200 + [1] * 100 + [2] * 3)
    small = stratified_subset(labels, 0.01, seed=0)
    large = stratified_subset(labels, 0.1, seed=0)
    assert [int((labels[small] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert [int((labels[large] == c).sum()) for c in range(3)] == [20, 10, 1]
    assert set(small) <= set(large)
    assert not np.array_equal(stratified_subset(labels, 0.1, seed=1), large)


def test_subset_view_keeps_metadata(tmp_path):
    root = _kaggle(tmp_path / "k")
    ds = ClassFolderDataset(root, split="Training")
    sub = DatasetSubset(ds, [0, 9])
    assert sub.classes == ds.classes and sub.targets == [0, 3] and len(sub) == 2
    assert sub.samples == [ds.samples[0], ds.samples[9]]


def test_pretraining_reads_patient_folders_as_unlabeled_says_what_it_found_and_hints_at_splits(tmp_path, caplog):
    """A folder of patient_* sub-folders was taken for 3 classes, a preset's data.split=Training failed with no hint,
    and the run log never said what data was read."""
    import logging

    from dinov2_repro.config import load_config
    from dinov2_repro.data.loaders import build_ssl_dataset

    for patient in ("patient_1", "patient_2", "patient_3"):
        (tmp_path / "scans" / patient).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / "scans" / patient / f"{i}.png")
    cfg = load_config("demo_cpu", [f"data.path={tmp_path / 'scans'}", "data.kind=auto", "data.split="])
    with caplog.at_level(logging.INFO, logger="dinov2_repro"):
        dataset = build_ssl_dataset(cfg)
    assert len(dataset) == 6
    assert f"data: folder at {tmp_path / 'scans'}: 6 images, unlabeled" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"split folder 'Training' not found .*set data\.split= \(empty\)"):
        build_ssl_dataset(load_config("demo_cpu", [f"data.path={tmp_path / 'scans'}", "data.kind=folder"]))
