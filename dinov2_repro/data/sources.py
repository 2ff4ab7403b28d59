"""Datasets that mix kinds: a folder holding 2D images next to NIfTI volumes or DICOM series, and CSV manifests
whose rows name images, volumes or DICOM files and series folders.

`ConcatImageDataset` puts several datasets under one class list; each sample is decoded by the dataset it came
from, and ``groups`` holds each sample's volume or patient (an image is its own group). A CSV row naming a volume
expands into the volume's kept slices, which all carry the row's label, split and group.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .datasets import UNLABELED, CsvDataset, ImageFileDataset, image_files_under
from .decode import is_image_file
from .dicom import DicomSliceDataset, dicom_files_dataset, dicom_files_under, is_dicom
from .volumes import (VolumeSliceDataset, is_nifti, nifti_files_under, split_slice_path, volume_dataset,
                      volume_options)

VOLUME_KINDS = {VolumeSliceDataset: "nifti", DicomSliceDataset: "dicom"}  # any other dataset holds images


class ConcatImageDataset(ImageFileDataset):
    """The samples of ``parts`` in order, relabelled to ``classes`` (default: the sorted union of their classes)."""

    def __init__(self, parts: Sequence[ImageFileDataset], root: str, classes: Optional[Sequence[str]] = None,
                 transform=None):
        classes = list(classes) if classes is not None else sorted({c for part in parts for c in part.classes})
        samples, self.groups, self.owner = [], [], []  # owner[i] = (part, index in it)
        for p, part in enumerate(parts):
            index = [classes.index(c) for c in part.classes]
            groups = getattr(part, "groups", None) or [path for path, _ in part.samples]
            samples += [(path, index[y] if y >= 0 else UNLABELED) for path, y in part.samples]
            self.owner += [(p, i) for i in range(len(part))]
            self.groups += list(groups)
        super().__init__(samples, classes, str(root), transform)
        self.parts = list(parts)
        self.skipped_volumes = [s for part in parts for s in getattr(part, "skipped_volumes", [])]
        self.skipped_files = [s for part in parts for s in getattr(part, "skipped_files", [])]

    def load_image(self, index: int):
        part, i = self.owner[index]
        return self.parts[part].load_image(i)


def kind_counts(dataset: ImageFileDataset) -> Dict[str, int]:
    """Samples per kind (image, nifti slices, dicom slices) of a dataset, mixed or not."""
    counts: Counter = Counter()
    for part in getattr(dataset, "parts", [dataset]):
        counts[next((name for cls, name in VOLUME_KINDS.items() if isinstance(part, cls)), "image")] += len(part)
    return dict(counts)


def folder_kinds(path: Path) -> List[str]:
    """The kinds of file below ``path`` (or of the file itself) among image, nifti and dicom, sorted; hidden entries
    are skipped."""
    if path.is_file():
        names = [str(path)]
    else:
        names = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            names += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted({kind for kind in map(file_kind, names) if kind})


def file_kind(path: str) -> Optional[str]:
    """image, nifti or dicom (a ``.dcm`` file or one with the DICM preamble); None for anything else."""
    return "nifti" if is_nifti(path) else "image" if is_image_file(path) else "dicom" if is_dicom(path) else None


def mixed_folder_dataset(root: os.PathLike | str, cfg_data=None, transform=None,
                         labelled: bool = True) -> ConcatImageDataset:
    """Every image, NIfTI volume and DICOM series below ``root``, as one dataset. With ``labelled`` and every file in
    a sub-folder, the top-level folders are the classes (for all kinds alike)."""
    root = Path(root)
    images, nifti, dicom = image_files_under(root), nifti_files_under(root), dicom_files_under(root)
    top = {path: Path(path).relative_to(root).parts for path in images + nifti + dicom}
    labelled = labelled and all(len(parts) > 1 for parts in top.values())
    parts: List[ImageFileDataset] = []
    if images:
        classes = sorted({top[path][0] for path in images}) if labelled else []
        samples = [(path, classes.index(top[path][0]) if labelled else UNLABELED) for path in images]
        parts.append(ImageFileDataset(samples, classes, str(root)))
    if nifti:
        parts.append(volume_dataset(root, cfg_data, labelled=labelled))
    if dicom:
        classes = sorted({top[path][0] for path in dicom}) if labelled else []
        label_of = {path: classes.index(top[path][0]) for path in dicom} if labelled else {}
        parts.append(dicom_files_dataset(dicom, classes, str(root), label_of, cfg_data))
    if not parts:
        raise FileNotFoundError(f"no images, NIfTI volumes or DICOM files under {root}")
    return ConcatImageDataset(parts, str(root), transform=transform)


class ManifestDataset(ConcatImageDataset):
    """A CSV manifest whose rows name volumes: `ConcatImageDataset` with the CSV's ``columns``, ``rows`` and
    ``row_of`` (the row of each sample), and a non-empty ``group`` cell as the group of its row's samples."""

    def __init__(self, table: CsvDataset, parts: Sequence[ImageFileDataset], row_of: Sequence[int]):
        super().__init__(parts, table.root, classes=table.classes, transform=table.transform)
        self.csv_path, self.split, self.columns, self.rows = table.csv_path, table.split, table.columns, table.rows
        self.row_of = list(row_of)
        if "group" in self.columns:  # the user's patient ids win over what the files say
            self.groups = [self.rows[r].get("group") or g for r, g in zip(self.row_of, self.groups)]


def manifest_dataset(csv_path: os.PathLike | str, split: Optional[str] = None, cfg_data=None,
                     transform=None) -> ImageFileDataset:
    """A CSV manifest (``path[,label][,split][,group]``) whose paths are images, NIfTI volumes, DICOM files or DICOM
    series folders; a `CsvDataset` when every row is an image. A missing path, or one of no known kind, is an error
    naming it."""
    table = CsvDataset(csv_path, split=split, transform=transform, check_files=False)
    paths = [path for path, _ in table.samples]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"{csv_path}: {len(missing)} path(s) in column 'path' do not exist, e.g. {missing[:3]}")
    kinds = [_row_kind(csv_path, path) for path in paths]
    if set(kinds) == {"image"}:
        return table
    parts, row_of = [], []
    for kind, build in (("image", _image_part), ("nifti", _nifti_part), ("dicom", _dicom_part)):
        rows = [r for r, k in enumerate(kinds) if k == kind]
        if rows:
            part, part_rows = build(csv_path, table, rows, cfg_data)
            parts.append(part)
            row_of += part_rows
    return ManifestDataset(table, parts, row_of)


def _row_kind(csv_path, path: str) -> str:
    kind = ("dicom" if dicom_files_under(Path(path)) else None) if os.path.isdir(path) else file_kind(path)
    if kind is None:
        raise ValueError(f"{csv_path}: {path} in column 'path' is not an image, a NIfTI volume (.nii, .nii.gz), a "
                         f"DICOM file or a folder of DICOM files")
    return kind


def _rows_by_file(csv_path, files_of_row: Dict[int, List[str]]) -> Dict[str, int]:
    """file -> its row; a file named by two rows is an error (its slices would be counted twice)."""
    row_of_file: Dict[str, int] = {}
    for row, files in files_of_row.items():
        for path in files:
            if row_of_file.setdefault(path, row) != row:
                raise ValueError(f"{csv_path}: {path} is named by more than one row of column 'path'")
    return row_of_file


def _image_part(csv_path, table: CsvDataset, rows: List[int], cfg_data):
    return ImageFileDataset([table.samples[r] for r in rows], table.classes, table.root), rows


def _nifti_part(csv_path, table: CsvDataset, rows: List[int], cfg_data):
    row_of_file = _rows_by_file(csv_path, {r: [table.samples[r][0]] for r in rows})
    labels = {path: table.samples[r][1] for path, r in row_of_file.items()}
    part = VolumeSliceDataset(list(row_of_file), table.classes, table.root, labels, **volume_options(cfg_data))
    return part, [row_of_file[split_slice_path(sample)[0]] for sample, _ in part.samples]


def _dicom_part(csv_path, table: CsvDataset, rows: List[int], cfg_data):
    files = {r: [p] if os.path.isfile(p) else dicom_files_under(Path(p)) for r, p in
             ((r, table.samples[r][0]) for r in rows)}
    row_of_file = _rows_by_file(csv_path, files)
    labels = {path: table.samples[r][1] for path, r in row_of_file.items()}
    part = dicom_files_dataset(sorted(row_of_file), table.classes, table.root, labels, cfg_data)
    return part, [row_of_file[part.series[uid][0]] for uid, _ in part.slice_index]


def open_unlabelled(path: os.PathLike | str, what: str = "--data") -> ImageFileDataset:
    """What a user points a command at, unlabelled: one image, NIfTI volume or DICOM file (a volume gives its kept
    slices), a folder (images only, or images, volumes and series mixed) or a CSV manifest of any of those.
    ``what`` names the option in the one-line errors."""
    from .datasets import UnlabeledFolderDataset
    from .loaders import build_image_dataset, volume_files_kind

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file or folder")
    if path.suffix.lower() == ".csv":
        return build_image_dataset(str(path), "csv", labelled=False)
    if path.is_dir():
        kind = volume_files_kind(path)
        return UnlabeledFolderDataset(path) if kind is None else build_image_dataset(str(path), kind, labelled=False)
    kind = file_kind(str(path))
    if kind == "image":
        return ImageFileDataset([(str(path), UNLABELED)], [], str(path.parent))
    if kind is None:
        raise ValueError(f"{what} {path}: not an image, NIfTI volume (.nii, .nii.gz), DICOM file or CSV manifest")
    dataset = (VolumeSliceDataset([str(path)], [], str(path.parent)) if kind == "nifti"
               else dicom_files_dataset([str(path)], [], str(path.parent), {}))
    if not len(dataset):
        raise ValueError(f"{what} {path}: no readable slice with enough foreground in this volume")
    return dataset
