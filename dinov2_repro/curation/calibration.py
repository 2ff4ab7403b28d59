"""Planted copies and their scoring, for calibrating the dedup threshold (benchmarks/curation_calibration.py) and
for the tests. A copy is one of the edits a dump of medical or web images holds: a resized, JPEG-recompressed,
slightly cropped or brightness-shifted version of an image."""

from __future__ import annotations

import io
from typing import Dict, Sequence

import numpy as np

COPY_KINDS = ("resize", "jpeg", "crop", "brightness")


def planted_copy(image, kind: str, rng: np.random.Generator):
    """PIL RGB image -> an edited copy: ``resize`` (0.5-0.75 of the side), ``jpeg`` (quality 40-70), ``crop``
    (85-92 % of each side at a random offset, resized back) or ``brightness`` (+-15-30 grey levels)."""
    from PIL import Image

    width, height = image.size
    if kind == "resize":
        scale = rng.uniform(0.5, 0.75)
        return image.resize((max(8, round(width * scale)), max(8, round(height * scale))), Image.BICUBIC)
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(40, 71)))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "crop":
        keep = rng.uniform(0.85, 0.92)
        w, h = round(width * keep), round(height * keep)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return image.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
    if kind == "brightness":
        shift = rng.uniform(15, 30) * rng.choice([-1, 1])
        pixels = np.asarray(image, dtype=np.float32) + shift
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    raise ValueError(f"unknown copy kind {kind!r} (one of {COPY_KINDS})")


def pair_scores(predicted: Sequence[int], origin: Sequence[int]) -> Dict[str, float]:
    """Pairwise precision and recall of a grouping: ``predicted`` (N,) group label of each image (a unique label
    for a kept-alone image), ``origin`` (N,) the image each one was made from. A pair is a duplicate when both come
    from one origin; it is found when both land in one predicted group."""
    predicted, origin = np.asarray(predicted), np.asarray(origin)
    same_pred = predicted[:, None] == predicted[None, :]
    same_true = origin[:, None] == origin[None, :]
    upper = np.triu(np.ones_like(same_pred), k=1)
    found, true = (same_pred & upper).sum(), (same_true & upper).sum()
    both = (same_pred & same_true & upper).sum()
    return dict(precision=float(both / found) if found else 1.0, recall=float(both / true) if true else 1.0,
                n_true_pairs=int(true), n_found_pairs=int(found))
