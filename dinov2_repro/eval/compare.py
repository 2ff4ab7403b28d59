"""Is backbone A better than backbone B on the same test images? A paired bootstrap of the accuracy difference.

Two backbones scored on one test split make *paired* predictions: each image is right or wrong under both. The
difference of their accuracies is the mean of ``correct_a - correct_b`` over images, and resampling images with
replacement (Efron & Tibshirani 1993, ch. 13, percentile interval) gives its sampling spread. That spread is what a
single headline number hides: with 100 test images one standard error of an accuracy near 30% is about 4.6 points,
so a lead of a few points is not evidence of anything.

The verdict is ``"better"`` when the whole interval is above zero, ``"worse"`` when it is below, and
``"inconclusive"`` otherwise. It speaks to this test set only: it does not include the spread over pretraining
seeds, which the docs measure separately.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np


def paired_correctness(a: Dict[str, Sequence], b: Dict[str, Sequence]):
    """Align two ``{"paths", "labels", "predicted"}`` prediction sets by image path -> (correct_a, correct_b).

    Raises ValueError naming the first mismatch when the two do not cover the same images with the same labels:
    a paired comparison of different images would be meaningless.
    """
    def by_path(pred: Dict[str, Sequence], name: str) -> Dict[str, tuple]:
        rows = {}
        for path, label, predicted in zip(pred["paths"], pred["labels"], pred["predicted"]):
            if path in rows:
                raise ValueError(f"{name}: test image {path} appears twice")
            rows[path] = (int(label), int(predicted))
        return rows

    rows_a, rows_b = by_path(a, "first"), by_path(b, "second")
    only = sorted(set(rows_a) ^ set(rows_b))
    if only:
        raise ValueError(f"the two prediction sets cover different test images ({len(only)} differ, e.g. {only[0]}); "
                         f"evaluate both backbones on the same data and split seed")
    paths = sorted(rows_a)
    for path in paths:
        if rows_a[path][0] != rows_b[path][0]:
            raise ValueError(f"test image {path} has label {rows_a[path][0]} in one set and {rows_b[path][0]} in the other")
    correct_a = np.array([rows_a[p][0] == rows_a[p][1] for p in paths], dtype=np.float64)
    correct_b = np.array([rows_b[p][0] == rows_b[p][1] for p in paths], dtype=np.float64)
    return correct_a, correct_b


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, n_resamples: int = 5000, confidence: float = 0.95,
                     seed: int = 0) -> Dict[str, Any]:
    """Accuracy difference A - B with a percentile bootstrap interval over images (resampled jointly for A and B).

    correct_a, correct_b: (N,) 0/1 per test image, same order. Returns difference, low, high, n, n_resamples,
    confidence, and the verdict ("better" | "worse" | "inconclusive").
    """
    correct_a = np.asarray(correct_a, dtype=np.float64)
    correct_b = np.asarray(correct_b, dtype=np.float64)
    if correct_a.shape != correct_b.shape or correct_a.ndim != 1 or len(correct_a) == 0:
        raise ValueError(f"need two equal, non-empty 1-d arrays, got {correct_a.shape} and {correct_b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    delta = correct_a - correct_b  # (N,) in {-1, 0, 1}
    n = len(delta)
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples)
    for start in range(0, n_resamples, 500):  # chunks keep the (chunk, N) index array small for large test sets
        stop = min(start + 500, n_resamples)
        resampled[start:stop] = delta[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    verdict = "better" if low > 0 else "worse" if high < 0 else "inconclusive"
    return dict(difference=float(delta.mean()), low=float(low), high=float(high), n=int(n),
                n_resamples=int(n_resamples), confidence=float(confidence), verdict=verdict)


def compare_predictions(a: Dict[str, Sequence], b: Dict[str, Sequence], **kwargs) -> Dict[str, Any]:
    """`paired_bootstrap` of two evaluations' ``test_predictions`` (as returned by `runner.evaluate`)."""
    correct_a, correct_b = paired_correctness(a, b)
    out = paired_bootstrap(correct_a, correct_b, **kwargs)
    out.update(accuracy_a=float(correct_a.mean()), accuracy_b=float(correct_b.mean()))
    return out
