"""Metrics against hand-computed values (dinov2_repro.eval.metrics)."""

import math

import numpy as np
import pytest

from dinov2_repro.eval.metrics import classification_metrics, summarize_runs


def test_metrics_match_hand_computed_confusion_matrix():
    # true:  0 0 0 1 1 2
    # pred:  0 0 1 1 2 2   -> confusion [[2,1,0],[0,1,1],[0,0,1]]
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, class_names=["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls 2/3, 1/2, 1 -> balanced accuracy is their mean
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    precision = {"a": 1.0, "b": 0.5, "c": 0.5}
    recall = {"a": 2 / 3, "b": 0.5, "c": 1.0}
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in "abc"}  # 0.8, 0.5, 2/3
    for c in "abc":
        row = m["per_class"][c]
        assert row["precision"] == pytest.approx(precision[c])
        assert row["recall"] == pytest.approx(recall[c])
        assert row["f1"] == pytest.approx(f1[c])
    assert [m["per_class"][c]["support"] for c in "abc"] == [3, 2, 1]
    assert m["macro_avg"]["f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["weighted_avg"]["f1"] == pytest.approx((3 * f1["a"] + 2 * f1["b"] + 1 * f1["c"]) / 6)
    assert m["weighted_avg"]["recall"] == pytest.approx(m["accuracy"])  # support-weighted recall = accuracy


def test_one_vs_rest_auc_hand_computed_and_absent_class():
    # class 0 scores: positives 0.9, 0.8, 0.4; negatives 0.5, 0.3, 0.1 -> 8 of 9 pairs ranked right
    probs = np.array([
        [0.9, 0.1, 0.0, 0.0],
        [0.8, 0.2, 0.0, 0.0],
        [0.4, 0.6, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.3, 0.7, 0.0, 0.0],
        [0.1, 0.9, 0.0, 0.0],
    ])
    y_true = [0, 0, 0, 1, 1, 1]  # classes 2 and 3 never occur
    y_pred = probs.argmax(1)
    m = classification_metrics(y_true, y_pred, probs, class_names=["a", "b", "c", "d"])
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(8 / 9)
    assert m["per_class"]["b"]["roc_auc"] == pytest.approx(8 / 9)  # two classes: the mirror image
    assert m["per_class"]["c"]["roc_auc"] is None and m["per_class"]["d"]["recall"] is None
    assert m["absent_classes"] == ["c", "d"]
    assert m["macro_avg"]["roc_auc"] == pytest.approx(8 / 9)  # averaged over the classes present only
    # y_pred = [0, 0, 1, 0, 1, 1]: recalls 2/3 and 2/3
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_avg"]["recall"] == pytest.approx(2 / 3)


def test_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="probs has shape"):
        classification_metrics([0, 1], [0, 1], np.ones((2, 3)) / 3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="must be equal"):
        classification_metrics([0, 1, 1], [0, 1], class_names=["a", "b"])


def test_summarize_runs_mean_and_sample_std():
    s = summarize_runs([0.8, 0.9, 1.0])
    assert s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1) and s["n"] == 3
    assert summarize_runs([0.7])["std"] == 0.0
    assert math.isnan(summarize_runs([])["mean"])


def test_sensitivity_and_specificity_hand_computed():
    # true 0 0 1 1 2, pred 0 1 1 1 0: class 0 has negatives {2, 3, 4} and one false positive (image 4)
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], class_names=["a", "b", "c"])
    assert [m["per_class"][c]["sensitivity"] for c in "abc"] == pytest.approx([0.5, 1.0, 0.0])
    assert [m["per_class"][c]["specificity"] for c in "abc"] == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_bootstrap_intervals_equal_a_plain_loop_over_the_same_resamples():
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    from dinov2_repro.eval.metrics import bootstrap_intervals

    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 60)
    y_pred = np.where(rng.random(60) < 0.7, y_true, rng.integers(0, 3, 60))
    fast = bootstrap_intervals(y_true, y_pred, 3, ["a", "b", "c"], n_resamples=200, seed=5)
    idx = np.random.default_rng(5).integers(0, 60, size=(200, 60))
    plain = {"accuracy": [], "balanced_accuracy": [], "macro_f1": [], "b": []}
    for row in idx:
        t, p = y_true[row], y_pred[row]
        plain["accuracy"].append((t == p).mean())
        plain["balanced_accuracy"].append(balanced_accuracy_score(t, p))
        plain["macro_f1"].append(f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0))
        plain["b"].append(recall_score(t, p, labels=[1], average="macro", zero_division=0))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert fast[key] == pytest.approx(list(np.percentile(plain[key], [2.5, 97.5])), abs=1e-12), key
    assert fast["recall"]["b"] == pytest.approx(list(np.percentile(plain["b"], [2.5, 97.5])), abs=1e-12)
    assert fast["accuracy"][0] < (y_true == y_pred).mean() < fast["accuracy"][1]
    perfect = bootstrap_intervals(y_true, y_true, 3, ["a", "b", "c"], n_resamples=50)
    assert perfect["accuracy"] == perfect["macro_f1"] == [1.0, 1.0]


def test_expected_calibration_error_hand_computed():
    # confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.55 (right): bins 14 and 8 of 15, each half the data:
    # ECE = 0.5 * |0.5 - 0.95| + 0.5 * |1.0 - 0.55| = 0.45
    probs = np.array([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0], [0.55, 0.45, 0.0], [0.0, 0.45, 0.55]])
    m = classification_metrics([0, 1, 0, 2], probs.argmax(1), probs, class_names=["a", "b", "c"])
    cal = m["calibration"]
    assert cal["ece"] == pytest.approx(0.45)
    assert cal["bins"][14] == dict(low=14 / 15, high=1.0, count=2, confidence=pytest.approx(0.95), accuracy=0.5)
    assert cal["bins"][8]["count"] == 2 and cal["bins"][8]["accuracy"] == 1.0
    assert sum(b["count"] for b in cal["bins"]) == 4
    assert classification_metrics([0, 1], [0, 1])["calibration"] is None  # no probabilities, no calibration
