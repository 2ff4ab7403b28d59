"""Classification metrics of one evaluated model on one split (scikit-learn underneath).

`classification_metrics` returns a JSON-able dict:
- ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present in y_true);
- ``per_class``: precision, recall, F1, support and one-vs-rest ROC-AUC of every class;
- ``macro_avg`` (unweighted mean over the classes present in y_true) and ``weighted_avg`` (weighted by support) of
  precision / recall / F1, and of the ROC-AUC;
- ``confusion_matrix``: rows = true class, columns = predicted class, every class listed;
- per class also ``sensitivity`` (= recall) and ``specificity`` (true negatives / all negatives, one vs rest);
- ``intervals``: 95% percentile-bootstrap intervals (1,000 resamples of the images, seeded) of accuracy, balanced
  accuracy, macro-F1 and every class's recall;
- with probabilities, ``calibration``: the expected calibration error of the top-class confidence (15 equal bins)
  and the per-bin confidence, accuracy and count of the reliability diagram.

A class absent from y_true has no recall and no ROC-AUC (``None``, listed in ``absent_classes``), instead of an
exception or a silent 0 that would drag the averages down.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> List[Optional[float]]:
    """ROC-AUC of class c vs the rest from ``probs[:, c]``; None where y_true has no positive or no negative."""
    from sklearn.metrics import roc_auc_score

    aucs: List[Optional[float]] = []
    for c in range(n_classes):
        positives = y_true == c
        if positives.all() or not positives.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(positives, probs[:, c])))
    return aucs


def classification_metrics(y_true, y_pred, probs=None, class_names: Optional[Sequence[str]] = None,
                           n_classes: Optional[int] = None) -> Dict[str, Any]:
    """Metrics of predictions ``y_pred`` (and class probabilities ``probs`` (N, C), optional) against ``y_true``."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = _as_numpy(y_true).astype(np.int64), _as_numpy(y_pred).astype(np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty 1-d arrays")
    if n_classes is None:
        n_classes = len(class_names) if class_names is not None else int(max(y_true.max(), y_pred.max())) + 1
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=0)
    present = support > 0
    aucs: List[Optional[float]] = [None] * n_classes
    if probs is not None:
        probs = _as_numpy(probs).astype(np.float64)
        if probs.shape != (len(y_true), n_classes):
            raise ValueError(f"probs has shape {probs.shape}, expected {(len(y_true), n_classes)}")
        aucs = one_vs_rest_auc(y_true, probs, n_classes)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    negatives = len(y_true) - support
    false_positives = matrix.sum(0) - np.diag(matrix)
    per_class = {}
    for c, name in enumerate(names):
        recall_c = float(recall[c]) if present[c] else None
        specificity = float(1 - false_positives[c] / negatives[c]) if negatives[c] else None
        per_class[name] = dict(precision=float(precision[c]), recall=recall_c, sensitivity=recall_c,
                               specificity=specificity, f1=float(f1[c]) if present[c] else None,
                               support=int(support[c]), roc_auc=aucs[c])

    def averages(weights: np.ndarray) -> Dict[str, Optional[float]]:
        w = weights[present] / weights[present].sum()
        out = {name: float((values[present] * w).sum())
               for name, values in (("precision", precision), ("recall", recall), ("f1", f1))}
        defined = [(a, wt) for a, wt in zip(np.array(aucs, dtype=object)[present], weights[present]) if a is not None]
        out["roc_auc"] = (float(sum(a * wt for a, wt in defined) / sum(wt for _, wt in defined))
                          if defined else None)
        return out

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():  # "y_pred contains classes not in y_true": handled by `present`
            warnings.simplefilter("ignore")
            balanced = float(balanced_accuracy_score(y_true, y_pred))
    return dict(
        n_samples=int(len(y_true)),
        accuracy=float((y_true == y_pred).mean()),
        balanced_accuracy=balanced,
        macro_avg=averages(np.ones(n_classes)),
        weighted_avg=averages(support.astype(np.float64)),
        per_class=per_class,
        confusion_matrix=matrix.tolist(),
        classes=names,
        absent_classes=[names[c] for c in range(n_classes) if not present[c]],
        intervals=bootstrap_intervals(y_true, y_pred, n_classes, names),
        calibration=calibration(y_true, probs) if probs is not None else None,
    )


def _rates(confusion: np.ndarray) -> Dict[str, np.ndarray]:
    """(B, C, C) confusion matrices -> per resample: accuracy, balanced accuracy, macro-F1 and recalls (B, C), over
    the classes present in each resample (NaN recall where a class is absent)."""
    diag = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    support, predicted = confusion.sum(2).astype(np.float64), confusion.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, diag / support, np.nan)
        precision = np.where(predicted > 0, diag / predicted, 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(support > 0, f1, np.nan)
    return dict(accuracy=diag.sum(1) / confusion.sum((1, 2)), balanced_accuracy=np.nanmean(recall, 1),
                macro_f1=np.nanmean(f1, 1), recall=recall)


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, names: Sequence[str],
                        n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Dict[str, Any]:
    """Percentile-bootstrap intervals over resamples of the images (seeded, so reports are reproducible)."""
    rng = np.random.default_rng(seed)
    n, chunks = len(y_true), []
    for start in range(0, n_resamples, 100):  # 100 resamples at a time: memory stays ~100 x N
        b = min(100, n_resamples - start)
        idx = rng.integers(0, n, size=(b, n))
        cells = np.arange(b)[:, None] * n_classes**2 + y_true[idx] * n_classes + y_pred[idx]
        chunks.append(np.bincount(cells.ravel(), minlength=b * n_classes**2).reshape(b, n_classes, n_classes))
    rates = _rates(np.concatenate(chunks))
    low, high = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> Optional[List[float]]:
        values = values[~np.isnan(values)]
        return [float(np.percentile(values, low)), float(np.percentile(values, high))] if values.size else None

    out: Dict[str, Any] = {key: interval(rates[key]) for key in ("accuracy", "balanced_accuracy", "macro_f1")}
    out["recall"] = {name: interval(rates["recall"][:, c]) if (y_true == c).any() else None
                     for c, name in enumerate(names)}
    out.update(level=level, n_resamples=n_resamples, method="percentile bootstrap over images", seed=seed)
    return out


def calibration(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> Dict[str, Any]:
    """Expected calibration error of the top-class confidence: sum over equal-width confidence bins of
    (bin size / N) x |accuracy - mean confidence| (Guo et al. 2017), and the reliability-diagram bins."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = (predicted == y_true).astype(np.float64)
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)  # confidence 1.0 goes in the last bin
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(bins, confidence, n_bins) / count
        accuracy = np.bincount(bins, correct, n_bins) / count
    used = count > 0
    ece = float((count[used] / len(y_true) * np.abs(accuracy[used] - mean_conf[used])).sum())
    return dict(ece=ece, n_bins=n_bins, bins=[dict(low=b / n_bins, high=(b + 1) / n_bins, count=int(count[b]),
                                                   confidence=float(mean_conf[b]) if used[b] else None,
                                                   accuracy=float(accuracy[b]) if used[b] else None)
                                              for b in range(n_bins)])


def summarize_runs(values: Sequence[float]) -> Dict[str, float]:
    """mean, std (sample std, ddof=1; 0 for one run), min, max, n of a metric over repeated runs."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), n=0)
    return dict(mean=float(arr.mean()), std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                min=float(arr.min()), max=float(arr.max()), n=int(arr.size))
