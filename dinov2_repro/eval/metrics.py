"""Classification metrics of one evaluated model on one split (scikit-learn underneath).

`classification_metrics` returns a JSON-able dict:
- ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present in y_true);
- ``per_class``: precision, recall, F1, support and one-vs-rest ROC-AUC of every class;
- ``macro_avg`` (unweighted mean over the classes present in y_true) and ``weighted_avg`` (weighted by support) of
  precision / recall / F1, and of the ROC-AUC;
- ``confusion_matrix``: rows = true class, columns = predicted class, every class listed.

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
    per_class = {}
    for c, name in enumerate(names):
        per_class[name] = dict(precision=float(precision[c]), recall=float(recall[c]) if present[c] else None,
                               f1=float(f1[c]) if present[c] else None, support=int(support[c]), roc_auc=aucs[c])

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
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        classes=names,
        absent_classes=[names[c] for c in range(n_classes) if not present[c]],
    )


def summarize_runs(values: Sequence[float]) -> Dict[str, float]:
    """mean, std (sample std, ddof=1; 0 for one run), min, max, n of a metric over repeated runs."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return dict(mean=float("nan"), std=float("nan"), min=float("nan"), max=float("nan"), n=0)
    return dict(mean=float(arr.mean()), std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                min=float(arr.min()), max=float(arr.max()), n=int(arr.size))
