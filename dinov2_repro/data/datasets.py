"""Image datasets: class folders (torchvision ImageFolder conventions, Kaggle Training/Testing layout),
unlabeled folders and CSV manifests, plus seeded stratified splits.

Every dataset exposes ``.samples`` (list of ``(path, label)``), ``.classes`` (sorted class names; empty when
unlabeled), ``.targets`` (labels; -1 = unlabeled) and ``.root``. ``__getitem__`` returns ``(image, label)``
where ``image`` is a uint8 tensor (3, H, W) (or whatever ``transform`` makes of it), or ``None`` when the file
cannot be decoded; that is announced once per path with ``warnings.warn`` and the SSL collate counts it.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .decode import IMG_EXTENSIONS, ImageDecodeError, decode_image_file, is_image_file

KAGGLE_SPLITS = ("Training", "Testing")
KAGGLE_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
UNLABELED = -1


class ImageFileDataset(torch.utils.data.Dataset):
    """Base class: a list of ``(path, label)`` samples decoded on access.

    ``image_format="tensor"`` returns uint8 (3, H, W) tensors; ``"pil"`` returns RGB PIL images (for
    transforms that need PIL). ``rescale_16bit`` picks the high-bit-depth rescaling ("minmax"|"percentile").
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], root: str,
                 transform: Optional[Callable] = None, image_format: str = "tensor",
                 rescale_16bit: str = "minmax"):
        if image_format not in ("tensor", "pil"):
            raise ValueError(f"image_format must be 'tensor' or 'pil', got {image_format!r}")
        self.samples: List[Tuple[str, int]] = [(str(p), int(y)) for p, y in samples]
        self.classes: List[str] = list(classes)
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.root = str(root)
        self.transform = transform
        self.image_format = image_format
        self.rescale_16bit = rescale_16bit
        self._warned: set = set()  # per process (each DataLoader worker warns on its own)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):
        """Decode sample ``index``; ``None`` (after one warning per path) when the file is unreadable."""
        path = self.samples[index][0]
        try:
            image = decode_image_file(path, rescale=self.rescale_16bit)
        except ImageDecodeError as exc:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {exc}", RuntimeWarning, stacklevel=2)
            return None
        if self.image_format == "pil":
            from PIL import Image

            return Image.fromarray(image.permute(1, 2, 0).numpy())
        return image

    def __getitem__(self, index: int):
        image = self.load_image(index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, n={len(self)}, "
                f"classes={self.classes if len(self.classes) <= 8 else len(self.classes)})")


def _visible_dirs(folder: Path) -> List[Path]:
    # Hidden folders (".ipynb_checkpoints", ".cache") are never classes: a deliberate deviation from ImageFolder.
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def image_files_under(folder: Path, extensions=IMG_EXTENSIONS) -> List[str]:
    """All image files below ``folder`` (recursive, following links, hidden entries skipped), in ImageFolder's
    order: folders sorted by path, files sorted by name within each folder."""
    per_folder = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders from the walk
        per_folder.append((dirpath, sorted(f for f in filenames
                                           if not f.startswith(".") and is_image_file(f, extensions))))
    return [os.path.join(dirpath, f) for dirpath, files in sorted(per_folder) for f in files]


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} is not a directory: {path}")


def resolve_split_dir(root: os.PathLike | str, split: Optional[str]) -> Path:
    """``root/split`` matched case-insensitively; error listing the available splits if absent.

    ``split`` empty/None returns ``root``. When ``root`` itself is named like the split it is returned as is,
    so ``data/brain_mri/Training`` with ``split="Training"`` works too.
    """
    root = Path(root)
    _require_dir(root, "dataset folder")
    if not split:
        return root
    exact = root / split
    if exact.is_dir():
        return exact
    matches = [d for d in _visible_dirs(root) if d.name.lower() == split.lower()]
    if len(matches) == 1:
        return matches[0]
    if root.name.lower() == split.lower():
        return root
    available = [d.name for d in _visible_dirs(root)]
    raise FileNotFoundError(f"split folder '{split}' not found in {root} (sub-folders: {available}); for a folder "
                            f"without splits set data.split= (empty), or name the split that holds the images")


class ClassFolderDataset(ImageFileDataset):
    """``root[/split]/<class>/**/<image>``; class indices follow the sorted class-folder names.

    The Kaggle Brain Tumor MRI layout is ``ClassFolderDataset(root, split="Training")`` (or ``"Testing"``).
    A class folder without images, or a folder without class folders, raises naming the path.
    """

    def __init__(self, root: os.PathLike | str, split: Optional[str] = None, transform: Optional[Callable] = None,
                 extensions=IMG_EXTENSIONS, image_format: str = "tensor", rescale_16bit: str = "minmax"):
        folder = resolve_split_dir(root, split)
        class_dirs = _visible_dirs(folder)
        if not class_dirs:
            loose = image_files_under(folder, extensions)
            hint = " (it holds images directly: use an unlabeled folder dataset)" if loose else ""
            raise FileNotFoundError(f"no class folders in {folder}{hint}")
        classes = [d.name for d in class_dirs]
        samples = []
        for label, class_dir in enumerate(class_dirs):
            files = image_files_under(class_dir, extensions)
            if not files:
                raise FileNotFoundError(
                    f"class folder {class_dir} holds no images with extensions {list(extensions)}")
            samples.extend((f, label) for f in files)
        super().__init__(samples, classes, str(folder), transform, image_format, rescale_16bit)
        self.split = split or ""


class UnlabeledFolderDataset(ImageFileDataset):
    """Every image below ``root`` (recursive), label -1: the usual pretraining input."""

    def __init__(self, root: os.PathLike | str, transform: Optional[Callable] = None, extensions=IMG_EXTENSIONS,
                 image_format: str = "tensor", rescale_16bit: str = "minmax"):
        folder = Path(root)
        _require_dir(folder, "image folder")
        files = image_files_under(folder, extensions)
        if not files:
            raise FileNotFoundError(f"no images with extensions {list(extensions)} found under {folder}")
        super().__init__([(f, UNLABELED) for f in files], [], str(folder), transform, image_format, rescale_16bit)


class CsvDataset(ImageFileDataset):
    """A CSV manifest with a ``path`` column (relative to the CSV's folder, or absolute), optional ``label``
    (class names or integers; empty = unlabeled), optional ``split`` (rows kept when it equals ``split``) and
    optional ``group`` (the patient). Rows naming volumes are read by `data.sources.manifest_dataset`.

    Class names are sorted to indices like a class folder; integer labels are used as they are (classes
    ``"0".."max"``). Missing files, an unknown split, a missing column or mixed label kinds raise naming the
    file, column and value.
    """

    def __init__(self, csv_path: os.PathLike | str, split: Optional[str] = None, transform: Optional[Callable] = None,
                 image_format: str = "tensor", rescale_16bit: str = "minmax", check_files: bool = True):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"CSV manifest not found: {csv_path}")
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        if "path" not in columns:
            raise ValueError(f"{csv_path}: required column 'path' is missing (columns: {columns})")
        if split:
            if "split" not in columns:
                raise ValueError(f"{csv_path}: split {split!r} requested but column 'split' is missing "
                                 f"(columns: {columns})")
            available = sorted({r["split"] for r in rows})
            if split not in available:
                raise ValueError(f"{csv_path}: column 'split' has no value {split!r} (values: {available})")
            rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise ValueError(f"{csv_path}: no rows{' for split ' + repr(split) if split else ''}")
        base = csv_path.parent
        paths = []
        for line, row in enumerate(rows, start=2):
            if not row["path"]:
                raise ValueError(f"{csv_path}: empty value in column 'path' (data row {line - 1})")
            p = Path(row["path"])
            paths.append(str(p if p.is_absolute() else base / p))
        if check_files:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{csv_path}: {len(missing)} file(s) in column 'path' do not exist, "
                                        f"e.g. {missing[:3]}")
        labels, classes = self._parse_labels(csv_path, [r.get("label", "") for r in rows], "label" in columns)
        super().__init__(list(zip(paths, labels)), classes, str(base), transform, image_format, rescale_16bit)
        self.split = split or ""
        self.csv_path = str(csv_path)
        self.columns, self.rows = columns, rows  # the rows kept (after the split filter), in order
        self.row_of = list(range(len(rows)))  # the row of each sample: one each here, several for a volume's slices
        # a non-empty 'group' cell names the sample's patient (splits keep it on one side); else the file is its own
        self.groups = [r.get("group") or p for r, p in zip(rows, paths)] if "group" in columns else None

    @staticmethod
    def _parse_labels(csv_path: Path, raw: List[str], has_column: bool):
        if not has_column or all(v == "" for v in raw):
            return [UNLABELED] * len(raw), []
        present = [v for v in raw if v != ""]
        integer = [v.lstrip("-").isdigit() for v in present]
        if all(integer):
            values = [int(v) if v != "" else UNLABELED for v in raw]
            bad = [v for v in values if v < UNLABELED]
            if bad:
                raise ValueError(f"{csv_path}: column 'label' has negative class index {bad[0]}")
            return values, [str(i) for i in range(max(values) + 1)]
        if any(integer):
            example = present[integer.index(True)]
            raise ValueError(f"{csv_path}: column 'label' mixes class names and integers (e.g. {example!r})")
        classes = sorted(set(present))
        index = {c: i for i, c in enumerate(classes)}
        return [index[v] if v != "" else UNLABELED for v in raw], classes


class DatasetSubset(ImageFileDataset):
    """A view of ``dataset`` restricted to ``indices`` that keeps ``.samples/.classes/.targets``; ``dataset``
    decodes (a volume slice is not a file of its own)."""

    def __init__(self, dataset: ImageFileDataset, indices: Sequence[int], transform: Optional[Callable] = None):
        indices = [int(i) for i in indices]
        super().__init__([dataset.samples[i] for i in indices], dataset.classes, dataset.root,
                         transform if transform is not None else dataset.transform,
                         dataset.image_format, dataset.rescale_16bit)
        self.indices, self.dataset = indices, dataset

    def load_image(self, index: int):
        return self.dataset.load_image(self.indices[index])


def looks_like_kaggle(root: os.PathLike | str) -> bool:
    """True when ``root`` has a ``Training`` (any case) sub-folder."""
    root = Path(root)
    return root.is_dir() and any(d.name.lower() == "training" for d in _visible_dirs(root))


def looks_like_class_folder(root: os.PathLike | str) -> bool:
    """True when ``root`` has visible sub-folders and no loose images at its top level."""
    root = Path(root)
    if not root.is_dir() or not _visible_dirs(root):
        return False
    return not any(is_image_file(p.name) for p in root.iterdir() if p.is_file())


def open_labeled_dataset(root: os.PathLike | str, split: Optional[str] = None, transform: Optional[Callable] = None,
                         **kwargs) -> ImageFileDataset:
    """A labeled dataset from a CSV manifest, a Kaggle-style root + split, or a plain class folder.

    ``split`` selects ``root/<split>`` for folders (case-insensitive) or the CSV's ``split`` column. With no split
    on a Kaggle-style root (Training/Testing inside) this raises rather than mixing train and test images.
    """
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return CsvDataset(root, split=split, transform=transform, **kwargs)
    if not split and looks_like_kaggle(root):
        splits = [d.name for d in _visible_dirs(root)]
        raise ValueError(f"{root} holds splits {splits}: pass split= (e.g. 'Training') to pick one")
    return ClassFolderDataset(root, split=split, transform=transform, **kwargs)


def _per_class_permutations(labels: Sequence[int], seed: int) -> Dict[int, np.ndarray]:
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Hold out ``val_fraction`` of every class (rounded; at least 1 per class with >= 2 samples, and at least
    1 left for training). Returns sorted, disjoint ``(train_idx, val_idx)`` int64 arrays. Seeded."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    train, val = [], []
    for _, perm in sorted(_per_class_permutations(labels, seed).items()):
        n = len(perm)
        n_val = min(max(int(round(n * val_fraction)), 1 if n >= 2 else 0), n - 1)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


def stratified_group_split(labels: Sequence[int], groups: Sequence[str], fraction: float,
                           seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of every class, whole groups at a time: a patient's (or volume's) images all
    land on one side. Each class keeps at least one group for training. Returns sorted, disjoint
    ``(kept_idx, held_idx)`` int64 arrays. Seeded."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    labels, groups = np.asarray(labels), np.asarray([str(g) for g in groups])
    rng = np.random.default_rng(seed)
    held: set = set()
    for c in np.unique(labels):
        members = labels == c
        class_groups = sorted(set(groups[members]))
        target = int(round(members.sum() * fraction))
        count = int(np.isin(groups[members], list(held)).sum())  # groups already held for another class
        for j in rng.permutation(len(class_groups)):
            left_for_training = sum(g not in held for g in class_groups)
            if count >= target or left_for_training <= 1:
                break
            if class_groups[j] not in held:
                held.add(class_groups[j])
                count += int((groups[members] == class_groups[j]).sum())
    is_held = np.isin(groups, list(held))
    return np.flatnonzero(~is_held).astype(np.int64), np.flatnonzero(is_held).astype(np.int64)


def stratified_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Keep ``fraction`` of every class (rounded, at least 1 per class) for label-efficiency runs.

    With one seed the subsets are nested: the 1% subset is inside the 10% subset. Returns sorted int64 indices.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    keep = [perm[:max(1, int(round(len(perm) * fraction)))]
            for _, perm in sorted(_per_class_permutations(labels, seed).items())]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def stratified_group_subset(labels: Sequence[int], groups: Sequence[str], fraction: float,
                            seed: int = 0) -> np.ndarray:
    """Keep about ``fraction`` of every class, whole groups at a time (label-efficiency runs on patients): in one
    seeded order of the groups, each class takes its groups while that brings its count closer to its target
    (``round(n * fraction)``, and at least one group). A group already taken for another class counts for this one
    too. Returns sorted int64 indices."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    labels, groups = np.asarray(labels), np.asarray([str(g) for g in groups])
    order = {g: i for i, g in enumerate(np.random.default_rng(seed).permutation(sorted(set(groups))))}
    kept: set = set()
    for c in np.unique(labels):
        sizes = Counter(groups[labels == c].tolist())
        target = max(1, int(round(sum(sizes.values()) * fraction)))
        count = sum(n for g, n in sizes.items() if g in kept)
        for g in sorted(sizes, key=order.get):
            if count >= target or (count and abs(count + sizes[g] - target) > target - count):
                break  # the next group would overshoot more than stopping here falls short
            if g not in kept:
                kept.add(g)
                count += sizes[g]
    return np.flatnonzero(np.isin(groups, list(kept))).astype(np.int64)


def loader_workers(requested: int, n_images: int, batch_size: int) -> int:
    """Worker processes for a loader: none for a handful of batches, where starting them costs more than decoding."""
    return int(requested) if n_images >= 4 * batch_size else 0


def image_list_sha1(samples: Sequence[Tuple[str, int]]) -> str:
    """Hash of (path, label, size, mtime) for every sample, in order: a changed or replaced file changes it."""
    digest = hashlib.sha1()
    for path, label in samples:
        try:
            stat = os.stat(path.split("::", 1)[0] if "::" in path and not os.path.exists(path) else path)
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}|{label}|missing\n".encode())
    return digest.hexdigest()
