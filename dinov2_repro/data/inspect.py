"""What a dataset holds, as the project will read it: counts per class and group, unreadable files with their
reasons, and a contact sheet of sample images per class (`dinov2-repro data inspect`)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any, Dict, List

import numpy as np

from .sources import kind_counts

KIND_LABELS = {"image": "2D images", "nifti": "NIfTI slices", "dicom": "DICOM slices"}


def inspect_dataset(dataset, progress: bool = True) -> Dict[str, Any]:
    """Decode every sample once; returns counts, the unreadable samples with their reasons, and a text summary."""
    unreadable: List[str] = []
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="decoding", unit="image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for i in indices:
            if dataset.load_image(i) is None:
                unreadable.append(dataset.samples[i][0])
    reasons = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    skipped = list(getattr(dataset, "skipped_volumes", [])) + list(getattr(dataset, "skipped_files", []))
    per_class = Counter(dataset.classes[y] if y >= 0 else "(unlabeled)" for _, y in dataset.samples)
    groups = getattr(dataset, "groups", None)
    kinds = kind_counts(dataset)
    grouped = ""
    if groups:
        grouped = (f" (slices) from {len(set(groups))} volume(s) or patient(s)" if "image" not in kinds
                   else f" in {len(set(groups))} group(s) (patients or volumes; an image with none is its own)")
    lines = [f"{type(dataset).__name__} at {dataset.root}: {len(dataset)} images{grouped}",
             "kinds: " + ", ".join(f"{label} {kinds[k]}" for k, label in KIND_LABELS.items() if k in kinds),
             "per class: " + ", ".join(f"{c} {n}" for c, n in sorted(per_class.items()))]
    if skipped:
        lines.append(f"skipped while indexing ({len(skipped)}):")
        lines += [f"  {path}: {why}" for path, why in skipped]
    lines.append(f"unreadable on decoding: {len(unreadable)}")
    lines += [f"  {reason}" for reason in reasons[:len(unreadable)]]
    return dict(n_images=len(dataset), kinds=kinds, per_class=dict(per_class),
                n_groups=len(set(groups)) if groups else None, skipped=skipped, unreadable=unreadable,
                text="\n".join(lines))


def contact_sheet(dataset, path: os.PathLike, per_class: int = 8) -> None:
    """A PNG grid: up to ``per_class`` readable images of each class (evenly spread over its samples), one row each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = sorted({y for _, y in dataset.samples})
    rows = []
    for y in labels:
        members = [i for i, (_, label) in enumerate(dataset.samples) if label == y]
        picks = [members[int(j)] for j in np.linspace(0, len(members) - 1, min(per_class, len(members)))]
        images = [img for img in (dataset.load_image(i) for i in picks) if img is not None]
        rows.append((dataset.classes[y] if y >= 0 else "unlabeled", images))
    fig = Figure(figsize=(1.4 * per_class, 1.5 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    for r, (name, images) in enumerate(rows):
        for c in range(per_class):
            ax = fig.add_subplot(len(rows), per_class, r * per_class + c + 1)
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).numpy(), cmap="gray")
            if c == 0:
                ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path)
