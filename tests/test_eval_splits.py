"""Evaluation splits: val held out of train, test untouched or held out (and said so), stratified label fractions."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dinov2_repro.eval.config import EvalDataConfig
from dinov2_repro.eval.splits import build_eval_splits, label_fraction_indices


def data_cfg(**kw):
    return EvalDataConfig(**kw)


def _write(folder, counts):
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), i, dtype=np.uint8), mode="L").save(folder / name / f"{i}.png")


def _per_class(dataset):
    return Counter(dataset.classes[y] for _, y in dataset.samples)


def test_kaggle_layout_keeps_testing_and_holds_val_out_of_training(tmp_path):
    _write(tmp_path / "Training", {"glioma": 20, "notumor": 10, "pituitary": 30})
    _write(tmp_path / "Testing", {"glioma": 3, "notumor": 2})  # a class missing from Testing still lines up
    splits = build_eval_splits(tmp_path, data_cfg())
    assert splits.classes == ["glioma", "notumor", "pituitary"]
    assert _per_class(splits.val) == {"glioma": 2, "notumor": 1, "pituitary": 3}
    assert _per_class(splits.train) == {"glioma": 18, "notumor": 9, "pituitary": 27}
    assert all("Testing" in p for p, _ in splits.test.samples) and len(splits.test) == 5
    assert {p for p, _ in splits.train.samples}.isdisjoint(p for p, _ in splits.val.samples)
    assert splits.notes == []
    assert [splits.classes[y] for p, y in splits.test.samples if "notumor" in p] == ["notumor"] * 2
    again = build_eval_splits(tmp_path, data_cfg())
    assert again.val.samples == splits.val.samples  # seeded
    other = build_eval_splits(tmp_path, data_cfg(split_seed=1))
    assert other.val.samples != splits.val.samples


def test_class_folder_without_test_split_holds_one_out_and_says_so(tmp_path):
    _write(tmp_path, {"a": 20, "b": 10})
    splits = build_eval_splits(tmp_path, data_cfg())
    assert _per_class(splits.test) == {"a": 4, "b": 2}
    assert sum(len(getattr(splits, s)) for s in ("train", "val", "test")) == 30
    paths = [set(p for p, _ in getattr(splits, s).samples) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(splits.notes) == 1 and "No separate test split" in splits.notes[0]


def test_csv_manifest_with_split_column(tmp_path):
    _write(tmp_path / "img", {"x": 6, "y": 6})
    rows = ["path,label,split"]
    for c in "xy":
        rows += [f"img/{c}/{i}.png,{c},{'test' if i < 2 else ('val' if i == 2 else 'train')}" for i in range(6)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    splits = build_eval_splits(tmp_path / "m.csv", data_cfg())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 4)
    assert splits.notes == []
    with pytest.raises(ValueError, match="no value 'holdout'"):
        build_eval_splits(tmp_path / "m.csv", data_cfg(test_split="holdout"))


def test_label_fractions_are_stratified_seeded_and_nested():
    labels = [0] * 40 + [1] * 20 + [2] * 8
    quarter = label_fraction_indices(labels, 0.25, seed=0)
    assert Counter(labels[i] for i in quarter) == {0: 10, 1: 5, 2: 2}
    half = label_fraction_indices(labels, 0.5, seed=0)
    assert set(quarter) <= set(half)  # same seed: the smaller subset is inside the larger
    assert set(label_fraction_indices(labels, 0.25, seed=1)) != set(quarter)
    assert list(label_fraction_indices(labels, 1.0, seed=3)) == list(range(68))
    tiny = label_fraction_indices(labels, 0.01, seed=0)
    assert Counter(labels[i] for i in tiny) == {0: 1, 1: 1, 2: 1}  # never drops a class


def test_a_class_name_that_training_lacks_is_an_error_naming_both_sets(tmp_path):
    """`notumor` in Training and `no_tumor` in Testing used to become a 5-class problem (accuracy 32.5% -> 22.5%,
    silently)."""
    _write(tmp_path / "mri" / "Training", {"glioma": 3, "notumor": 3})
    _write(tmp_path / "mri" / "Testing", {"glioma": 2, "no_tumor": 2})
    with pytest.raises(ValueError, match=r"train: \['glioma', 'notumor'\]; test: \['glioma', 'no_tumor'\]\): "
                                         r"test has \['no_tumor'\], which training lacks"):
        build_eval_splits(tmp_path / "mri", data_cfg())
    # a test split that merely misses a class is fine
    _write(tmp_path / "ok" / "Training", {"glioma": 3, "notumor": 3})
    _write(tmp_path / "ok" / "Testing", {"glioma": 2})
    assert build_eval_splits(tmp_path / "ok", data_cfg()).classes == ["glioma", "notumor"]
    csv_path = tmp_path / "m.csv"
    rows = [f"{tmp_path}/mri/Training/glioma/0.png,glioma,train", f"{tmp_path}/mri/Training/notumor/0.png,notumor,train",
            f"{tmp_path}/mri/Testing/no_tumor/0.png,no_tumor,test"]
    csv_path.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"m\.csv: .*test has \['no_tumor'\], which training lacks"):
        build_eval_splits(csv_path, data_cfg())


def _write_patients(folder, patients_per_class, images_per_patient=3):
    for label, patients in patients_per_class.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for patient in patients:
            for i in range(images_per_patient):
                Image.fromarray(np.full((8, 8), i, dtype=np.uint8), mode="L").save(
                    folder / label / f"patient_{patient}_slice{i}.png")


def test_group_splits_keep_every_patient_on_one_side(tmp_path):
    _write_patients(tmp_path / "mri", {"glioma": range(0, 10), "normal": range(10, 20)})
    cfg = data_cfg(group_regex=r"patient_(\d+)_", test_fraction=0.2, val_fraction=0.2)
    splits = build_eval_splits(tmp_path / "mri", cfg)
    patients = {name: {p.split("patient_")[1].split("_")[0] for p, _ in getattr(splits, name).samples}
                for name in ("train", "val", "test")}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    assert not (patients["val"] & patients["test"])
    assert len(patients["test"]) == 4 and len(patients["val"]) == 4  # 20% of 10 patients per class, x 2 classes
    assert sum(len(getattr(splits, n)) for n in ("train", "val", "test")) == 60  # nothing lost
    assert any("groups (patients or volumes) per split: train 12, val 4, test 4" in n for n in splits.notes)
    assert any("by whole groups" in n for n in splits.notes)
    with pytest.raises(ValueError, match=r"data\.group_regex 'case_.*' finds no group in .*patient_0_slice0\.png"):
        build_eval_splits(tmp_path / "mri", data_cfg(group_regex=r"case_(\d+)"))


def test_a_patient_in_training_and_test_is_an_error_unless_allowed(tmp_path):
    _write_patients(tmp_path / "k" / "Training", {"glioma": [1, 2, 3], "normal": [4, 5, 6]})
    _write_patients(tmp_path / "k" / "Testing", {"glioma": [3, 7], "normal": [8]})  # patient 3 in both
    cfg = data_cfg(group_regex=r"patient_(\d+)_")
    with pytest.raises(ValueError, match=r"1 group\(s\) are in the test split and in training or validation, "
                                         r"e.g. \['3'\].*data.allow_group_overlap=true"):
        build_eval_splits(tmp_path / "k", cfg)
    allowed = build_eval_splits(tmp_path / "k", data_cfg(group_regex=r"patient_(\d+)_", allow_group_overlap=True))
    assert any("1 shared with the test split (allowed" in n for n in allowed.notes)


def test_stratified_group_split_by_hand():
    from dinov2_repro.data.datasets import stratified_group_split

    labels = [0] * 6 + [1] * 4
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    kept, held = stratified_group_split(labels, groups, 0.5, seed=0)
    held_groups = {groups[i] for i in held}
    kept_groups = {groups[i] for i in kept}
    assert not held_groups & kept_groups and len(kept) + len(held) == 10
    assert len(held_groups & {"a", "b", "c"}) in (1, 2) and len(held_groups & {"d", "e"}) == 1
    assert kept_groups & {"a", "b", "c"} and kept_groups & {"d", "e"}  # every class keeps a group for training
    again = stratified_group_split(labels, groups, 0.5, seed=0)
    assert [a.tolist() for a in again] == [kept.tolist(), held.tolist()]  # seeded


def test_group_label_fractions_by_hand():
    labels = [0] * 6 + [1] * 4
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    kept = label_fraction_indices(labels, 0.5, seed=0, groups=groups)
    kept_groups = [groups[i] for i in kept]
    # class 0 aims at 3 of 6: one group of 2 falls 1 short, a second overshoots by 1: the tie takes it (4);
    # class 1 aims at 2 of 4: exactly one group
    assert sum(labels[i] == 0 for i in kept) == 4 and sum(labels[i] == 1 for i in kept) == 2
    assert all(kept_groups.count(g) == 2 for g in set(kept_groups))
    assert label_fraction_indices(labels, 1.0, seed=0, groups=groups).tolist() == list(range(10))


def test_group_label_fractions_never_split_a_group_and_honour_the_fraction_per_class():
    rng = np.random.default_rng(1)
    labels, groups = [], []
    for c, n_groups in ((0, 30), (1, 20), (2, 12)):
        for g in range(n_groups):
            size = int(rng.integers(1, 7))
            labels += [c] * size
            groups += [f"c{c}g{g}"] * size
    labels, groups = np.array(labels), np.array(groups)
    for fraction in (0.1, 0.3, 0.5):
        for seed in range(3):
            kept = np.zeros(len(labels), bool)
            kept[label_fraction_indices(labels.tolist(), fraction, seed, groups=groups.tolist())] = True
            for g in set(groups):
                assert len(set(kept[groups == g])) == 1, (fraction, seed, g)  # a group is all in or all out
            for c in range(3):
                n, target = (labels == c).sum(), max(1, round((labels == c).sum() * fraction))
                # whole groups of at most 6 images: the count misses the target by at most half a group
                assert abs(kept[labels == c].sum() - target) <= 3, (fraction, seed, c, kept[labels == c].sum(), n)
    a = label_fraction_indices(labels.tolist(), 0.3, 5, groups=groups.tolist())
    assert a.tolist() == label_fraction_indices(labels.tolist(), 0.3, 5, groups=groups.tolist()).tolist()  # seeded


def test_label_fraction_runs_take_whole_patients_of_the_training_features():
    import torch

    from dinov2_repro.eval.features import FeatureSet
    from dinov2_repro.eval.runner import fraction_of_train

    paths = [f"scan{i}.png" for i in range(12)]
    groups = {p: f"patient{i // 3}" for i, p in enumerate(paths)}  # 4 patients of 3 images, 2 per class
    train = FeatureSet(cls=torch.randn(12, 1, 4), patch_mean=None, labels=torch.tensor([0] * 6 + [1] * 6),
                       paths=paths)
    half = fraction_of_train(train, 0.5, 0, groups)
    assert len(half) == 6 and set(Counter(groups[p] for p in half.paths).values()) == {3}  # two whole patients
    assert sorted(half.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(fraction_of_train(train, 0.5, 0, None)) == 6  # without groups: 3 images per class, any


def test_the_report_lists_the_groups_of_each_split_by_name_and_counts_the_rest():
    from dinov2_repro.eval.report import group_lines

    lines = group_lines({"train": [f"p{i:02d}" for i in range(25)], "val": ["q1"], "test": ["r1", "r2"]})
    assert "- train (25): `p00`, `p01`" in lines[2] and lines[2].endswith("`p19`, ... and 5 more")
    assert "`p20`" not in lines[2] and lines[3] == "- val (1): `q1`" and lines[4] == "- test (2): `r1`, `r2`"
    assert group_lines(None) == []
