"""Train / val / test splits of a labelled dataset for evaluation.

Layouts: the Kaggle one (``Training/<class>``, ``Testing/<class>``; also ``train``/``test``/``val`` folders), a
single class folder (``<class>/*``), or a CSV manifest (``path,label[,split][,group]``); folders and CSV rows may
hold 2D images, NIfTI volumes and DICOM series (a volume's slices share its group). Rules:

- the validation split is always held out of the training split (stratified, seeded, 10% by default) unless a
  separate validation split exists; every selection (learning rate, head, k, early stopping) uses it;
- the test split is only used for the final report;
- with no separate test split, a stratified test split is held out first, and the report says so.

Class indices are shared by all splits (union of class names, sorted), so a split missing a class still lines up.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.datasets import ImageFileDataset

TRAIN_NAMES = ("training", "train")
VAL_NAMES = ("validation", "val", "valid")
TEST_NAMES = ("testing", "test")


@dataclass
class EvalSplits:
    """Datasets (``.samples`` = list of (path, label); images decoded on access) and how they were made."""

    train: "object"
    val: "object"
    test: "object"
    classes: List[str]
    notes: List[str] = field(default_factory=list)
    source: Dict[str, str] = field(default_factory=dict)  # split -> where it came from
    groups: Optional[Dict[str, str]] = None  # sample path -> its group (patient, volume); None without groups

    def counts(self) -> Dict[str, Dict[str, int]]:
        """Images per class in each split."""
        out = {}
        for name in ("train", "val", "test"):
            labels = [y for _, y in getattr(self, name).samples]
            out[name] = {c: labels.count(i) for i, c in enumerate(self.classes)}
        return out

    def split_groups(self) -> Optional[Dict[str, List[str]]]:
        """The sorted group names of each split (None without groups)."""
        if self.groups is None:
            return None
        return {name: sorted({self.groups[p] for p, _ in getattr(self, name).samples})
                for name in ("train", "val", "test")}

    def describe(self) -> Dict[str, object]:
        return dict(classes=self.classes, counts=self.counts(), notes=self.notes, source=self.source,
                    groups=self.split_groups())


Sources = Dict[str, Tuple[object, int, str]]  # sample path -> (dataset that decodes it, its index there, its group)


def _dataset(samples: Sequence[Tuple[str, int]], classes: Sequence[str], root: str, sources: Sources):
    if sources:
        return SourcedImages(list(samples), list(classes), root, sources)
    return ImageFileDataset(list(samples), list(classes), root)


def _open_folder(folder: Path, cfg) -> Tuple[object, Sources]:
    """A split (or class) folder of images, NIfTI volumes or DICOM series, and for volumes where each slice comes
    from (slices are decoded by their volume's dataset, and grouped by volume or patient)."""
    from ..data.datasets import ClassFolderDataset
    from ..data.loaders import build_image_dataset, volume_files_kind

    kind = volume_files_kind(folder)
    if kind is None:
        return ClassFolderDataset(folder), {}
    dataset = build_image_dataset(str(folder), kind, data_cfg=cfg, labelled=True)
    if not dataset.classes:
        raise ValueError(f"{folder}: the volumes need class folders for evaluation ({folder}/<class>/...)")
    return dataset, {path: (dataset, i, dataset.groups[i]) for i, (path, _) in enumerate(dataset.samples)}


class SourcedImages(ImageFileDataset):
    """Samples decoded by the datasets they came from (volume slices): one split's view over them."""

    def __init__(self, samples, classes, root: str, sources: Sources):
        super().__init__(samples, classes, root)
        self.sources = {path: sources[path] for path, _ in samples}

    def load_image(self, index: int):
        dataset, source_index, _ = self.sources[self.samples[index][0]]
        return dataset.load_image(source_index)


def _find_split(root: Path, wanted: str, names: Sequence[str]) -> Optional[str]:
    """The sub-folder name for a split: ``wanted`` if given (must exist), else the first of ``names`` present."""
    subdirs = {d.name.lower(): d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if wanted:
        if wanted.lower() not in subdirs:
            raise FileNotFoundError(f"split folder {wanted!r} not found in {root} (sub-folders: {sorted(subdirs.values())})")
        return subdirs[wanted.lower()]
    for name in names:
        if name in subdirs:
            return subdirs[name]
    return None


def check_same_classes(classes_by_split: Dict[str, Sequence[str]], where: str) -> None:
    """No split may hold a class that the training split lacks: a renamed folder (``notumor`` vs ``no_tumor``)
    would otherwise become an extra class that no training image has, and accuracy would drop with no error. (A
    class missing from a small test or validation split is allowed.)"""
    names = {split: set(classes) for split, classes in classes_by_split.items()}
    train = names.get("train")
    unseen = {split: sorted(n - train) for split, n in names.items() if train is not None and n - train}
    if not unseen:
        return
    described = "; ".join(f"{split}: {sorted(n)}" for split, n in names.items())
    odd = "; ".join(f"{split} has {classes}" for split, classes in unseen.items())
    raise ValueError(f"{where}: the splits name different classes ({described}): {odd}, which training lacks. "
                     f"Rename the folders (or the CSV labels) so that every split uses the training class names")


def _relabel(samples_by_split: Dict[str, Tuple[List[Tuple[str, int]], List[str]]], where: str):
    """Per-split (samples, classes) -> shared sorted class list and samples relabelled to it."""
    check_same_classes({split: split_classes for split, (_, split_classes) in samples_by_split.items()}, where)
    classes = sorted({c for _, split_classes in samples_by_split.values() for c in split_classes})
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, (samples, split_classes) in samples_by_split.items():
        out[split] = [(p, index[split_classes[y]]) for p, y in samples]
    return out, classes


def _folder_splits(root: Path, cfg):
    """(samples per split, classes, where each split came from, the `Sources` of volume slices)."""
    train_name = _find_split(root, cfg.train_split, TRAIN_NAMES)
    if train_name is None:
        if cfg.test_split or cfg.val_split:
            raise FileNotFoundError(f"{root}: data.test_split/val_split given but there is no training split folder "
                                    f"(one of {TRAIN_NAMES}, or set data.train_split)")
        dataset, sources = _open_folder(root, cfg)
        return {"all": dataset.samples}, dataset.classes, {"all": str(root)}, sources
    found = {"train": train_name}
    test_name = _find_split(root, cfg.test_split, TEST_NAMES)
    val_name = _find_split(root, cfg.val_split, VAL_NAMES)
    if test_name:
        found["test"] = test_name
    if val_name:
        found["val"] = val_name
    per_split, sources = {}, {}
    for split, name in found.items():
        dataset, split_sources = _open_folder(root / name, cfg)
        per_split[split] = (dataset.samples, dataset.classes)
        sources.update(split_sources)
    samples, classes = _relabel(per_split, str(root))
    return samples, classes, {split: str(root / name) for split, name in found.items()}, sources


def _csv_splits(csv_path: Path, cfg):
    """(samples per split, classes, where each split came from, the `Sources` of volume slices, the CSV's groups)."""
    from ..data.datasets import CsvDataset
    from ..data.sources import manifest_dataset

    dataset = manifest_dataset(csv_path, cfg_data=cfg)  # every row, labels from the whole file: shared by all splits
    rows = [dataset.rows[r] for r in dataset.row_of]  # the CSV row of each sample (a volume's slices share one)
    if not dataset.classes:
        raise ValueError(f"{csv_path}: no labels (column 'label' missing or empty); evaluation needs labels")
    sources = {} if isinstance(dataset, CsvDataset) else {
        path: (dataset, i, dataset.groups[i]) for i, (path, _) in enumerate(dataset.samples)}
    explicit = {path: row["group"] for (path, _), row in zip(dataset.samples, rows) if row.get("group")}
    if "split" not in dataset.columns:
        if cfg.train_split or cfg.test_split or cfg.val_split:
            raise ValueError(f"{csv_path}: data.*_split given but the CSV has no 'split' column")
        return {"all": dataset.samples}, dataset.classes, {"all": str(csv_path)}, sources, explicit
    values = {r["split"] for r in dataset.rows}
    lower = {v.lower(): v for v in values}

    def pick(wanted: str, names: Sequence[str]) -> Optional[str]:
        if wanted:
            if wanted not in values:
                raise ValueError(f"{csv_path}: column 'split' has no value {wanted!r} (values: {sorted(values)})")
            return wanted
        return next((lower[n] for n in names if n in lower), None)

    found = {"train": pick(cfg.train_split, TRAIN_NAMES), "test": pick(cfg.test_split, TEST_NAMES),
             "val": pick(cfg.val_split, VAL_NAMES)}
    if found["train"] is None:
        raise ValueError(f"{csv_path}: no training split in column 'split' (values: {sorted(values)}); "
                         f"set data.train_split")
    unused = sorted(values - {v for v in found.values() if v})
    samples = {split: [s for s, r in zip(dataset.samples, rows) if r["split"] == name]
               for split, name in found.items() if name}
    check_same_classes({split: {dataset.classes[y] for _, y in rows_} for split, rows_ in samples.items()},
                       str(csv_path))
    source = {split: f"{csv_path} (split={name})" for split, name in found.items() if name}
    if unused:
        source["ignored_split_values"] = ", ".join(unused)
    return samples, dataset.classes, source, sources, explicit


def resolve_groups(paths: Sequence[str], group_regex: str = "", known: Optional[Dict[str, str]] = None,
                   explicit: Optional[Dict[str, str]] = None) -> Optional[Dict[str, str]]:
    """Each path's group (patient): the CSV's ``group`` cell (``explicit``) wins, then the first group (else the
    match) of ``group_regex``, then the volume's or DICOM patient's (``known``); a path with none is its own group.
    None when no path has a group. A path the regex misses is an error."""
    explicit, known = explicit or {}, known or {}
    pattern = re.compile(group_regex) if group_regex else None
    if not (explicit or known or pattern):
        return None
    groups = {}
    for path in paths:
        if path in explicit:
            groups[path] = explicit[path]
        elif pattern is not None:
            match = pattern.search(path)
            if match is None:
                raise ValueError(f"data.group_regex {group_regex!r} finds no group in {path}")
            groups[path] = match.group(1) if pattern.groups else match.group(0)
        else:
            groups[path] = known.get(path, path)
    return groups


def _hold_out(samples: List[Tuple[str, int]], fraction: float, cfg,
              groups: Optional[Dict[str, str]] = None) -> Tuple[List, List, str]:
    """(kept, held out, how): stratified per class, whole groups at a time when the samples have groups."""
    from ..data.datasets import stratified_group_split, stratified_split

    labels = [y for _, y in samples]
    if groups is None:
        kept, held = stratified_split(labels, fraction, seed=cfg.split_seed)
        how = f"stratified, seed {cfg.split_seed}"
    else:
        kept, held = stratified_group_split(labels, [groups[p] for p, _ in samples], fraction, seed=cfg.split_seed)
        how = f"stratified by whole groups, seed {cfg.split_seed}"
    return [samples[i] for i in kept], [samples[i] for i in held], how


def check_group_leakage(samples: Dict[str, List[Tuple[str, int]]], cfg, where: str,
                        groups: Optional[Dict[str, str]] = None) -> Optional[str]:
    """An error when a group (patient) is in the test split and in training or validation, unless
    ``data.allow_group_overlap``; returns a note with the groups per split (None without groups)."""
    if groups is None:
        return None
    per_split = {split: {groups[p] for p, _ in s} for split, s in samples.items()}
    shared = sorted((per_split["train"] | per_split["val"]) & per_split["test"])
    if shared and not cfg.allow_group_overlap:
        raise ValueError(f"{where}: {len(shared)} group(s) are in the test split and in training or validation, "
                         f"e.g. {shared[:3]}: their images would leak; keep each patient in one split, or set "
                         f"data.allow_group_overlap=true to accept it")
    counts = ", ".join(f"{split} {len(per_split[split])}" for split in ("train", "val", "test"))
    overlap = f"; {len(shared)} shared with the test split (allowed by data.allow_group_overlap)" if shared else ""
    return f"groups (patients or volumes) per split: {counts}{overlap}"


def _read_samples(root: Path, cfg):
    """(labelled samples per split or "all", classes, source, `Sources`, groups by path or None, notes)."""
    if root.suffix.lower() == ".csv":
        samples, classes, source, sources, explicit = _csv_splits(root, cfg)
    else:
        (samples, classes, source, sources), explicit = _folder_splits(root, cfg), {}
    notes: List[str] = []
    dropped = {split: sum(1 for _, y in s if y < 0) for split, s in samples.items()}
    if any(dropped.values()):
        notes.append(f"unlabelled rows left out: {dropped}")
        samples = {split: [(p, y) for p, y in s if y >= 0] for split, s in samples.items()}
    for split, split_samples in samples.items():
        if not split_samples:
            raise ValueError(f"--data {root}: split {split!r} ({source.get(split)}) has no labelled images")
    known = {path: group for path, (_, _, group) in sources.items()}
    groups = resolve_groups([p for s in samples.values() for p, _ in s], cfg.group_regex, known, explicit)
    return samples, classes, source, sources, groups, notes


def build_eval_splits(data_path: os.PathLike | str, cfg) -> EvalSplits:
    """Splits for ``data_path`` under the ``data`` section of the eval config (see module docstring)."""
    root = Path(data_path)
    if not root.exists():
        raise FileNotFoundError(f"--data {root}: no such file or directory")
    samples, classes, source, sources, groups, notes = _read_samples(root, cfg)
    if "all" in samples:
        samples["train"], samples["test"], how = _hold_out(samples.pop("all"), cfg.test_fraction, cfg, groups)
        source = {"train": source["all"], "test": source["all"]}
        notes.append(f"No separate test split in {root}: held out {cfg.test_fraction:.0%} of each class "
                     f"({how}) as the test split. Nothing is selected on it.")
    if "test" not in samples:
        samples["train"], samples["test"], how = _hold_out(samples["train"], cfg.test_fraction, cfg, groups)
        notes.append(f"No test split found next to the training split: held out {cfg.test_fraction:.0%} of the "
                     f"training split ({how}) as the test split.")
    if "val" not in samples:
        samples["train"], samples["val"], how = _hold_out(samples["train"], cfg.val_fraction, cfg, groups)
        source["val"] = f"{cfg.val_fraction:.0%} of the training split held out per class ({how})"
    group_note = check_group_leakage(samples, cfg, f"--data {root}", groups)
    if group_note:
        notes.append(group_note)
    overlap = {p for p, _ in samples["train"]} & {p for p, _ in samples["test"]}
    if overlap:
        raise ValueError(f"--data {root}: {len(overlap)} files are in both the training and the test split, "
                         f"e.g. {sorted(overlap)[:3]}")
    datasets = {name: _dataset(samples[name], classes, str(root), sources) for name in ("train", "val", "test")}
    return EvalSplits(train=datasets["train"], val=datasets["val"], test=datasets["test"], classes=classes,
                      notes=notes, source=source, groups=groups)


def label_fraction_indices(labels: Sequence[int], fraction: float, seed: int,
                           groups: Optional[Sequence[str]] = None):
    """Stratified, seeded subset of the training labels for label-efficiency runs (all of them at 1.0); with
    ``groups`` (each sample's patient or volume) whole groups are kept or left out."""
    import numpy as np

    from ..data.datasets import stratified_group_subset, stratified_subset

    if fraction >= 1.0:
        return np.arange(len(labels), dtype=np.int64)
    if groups is not None:
        return stratified_group_subset(labels, groups, fraction, seed=seed)
    return stratified_subset(labels, fraction, seed=seed)
