"""Paired bootstrap of an accuracy difference: exact endpoints, the normal approximation, and path alignment."""

import math

import numpy as np
import pytest

from dinov2_repro.eval.compare import compare_predictions, paired_bootstrap, paired_correctness


def test_identical_predictions_give_a_zero_width_interval():
    correct = np.array([1, 0, 1, 1, 0], dtype=float)
    out = paired_bootstrap(correct, correct)
    assert (out["difference"], out["low"], out["high"], out["verdict"]) == (0.0, 0.0, 0.0, "inconclusive")


def test_all_right_against_all_wrong_is_exactly_one_point_each_way():
    ones, zeros = np.ones(30), np.zeros(30)
    assert paired_bootstrap(ones, zeros)["low"] == 1.0 and paired_bootstrap(ones, zeros)["verdict"] == "better"
    worse = paired_bootstrap(zeros, ones)
    assert (worse["difference"], worse["high"], worse["verdict"]) == (-1.0, -1.0, "worse")


def test_interval_matches_the_normal_approximation():
    # 100 images: A alone right on 20, B alone right on 10, both agree on 70. delta = +1 x20, -1 x10, 0 x70:
    # mean 0.1, variance 0.3 - 0.01 = 0.29, standard error sqrt(0.29 / 100) = 0.0539, 95% ~ 0.1 -/+ 0.1055.
    a = np.array([1] * 20 + [0] * 10 + [1] * 35 + [0] * 35, dtype=float)
    b = np.array([0] * 20 + [1] * 10 + [1] * 35 + [0] * 35, dtype=float)
    out = paired_bootstrap(a, b, n_resamples=20000, seed=1)
    half = 1.96 * math.sqrt(0.29 / 100)
    assert out["difference"] == pytest.approx(0.1)
    assert out["low"] == pytest.approx(0.1 - half, abs=0.012) and out["high"] == pytest.approx(0.1 + half, abs=0.012)
    assert out["verdict"] == "inconclusive"  # the lower end is just below zero
    # the same lead on 4x the images is conclusive (half-width halves)
    big = paired_bootstrap(np.tile(a, 4), np.tile(b, 4), n_resamples=20000, seed=1)
    assert big["low"] > 0 and big["verdict"] == "better"


def test_pairs_are_aligned_by_path_not_by_order():
    a = dict(paths=["x", "y", "z"], labels=[0, 1, 2], predicted=[0, 1, 0])
    b = dict(paths=["z", "x", "y"], labels=[2, 0, 1], predicted=[2, 1, 1])
    correct_a, correct_b = paired_correctness(a, b)  # sorted by path: x, y, z
    assert correct_a.tolist() == [1, 1, 0] and correct_b.tolist() == [0, 1, 1]
    out = compare_predictions(a, b, n_resamples=100)
    assert out["accuracy_a"] == pytest.approx(2 / 3) and out["difference"] == pytest.approx(0.0)


def test_mismatched_sets_raise_naming_the_image():
    a = dict(paths=["x", "y"], labels=[0, 1], predicted=[0, 1])
    with pytest.raises(ValueError, match="2 differ, e.g. w"):
        paired_correctness(a, dict(paths=["x", "w"], labels=[0, 1], predicted=[0, 1]))
    with pytest.raises(ValueError, match="test image y has label 1"):
        paired_correctness(a, dict(paths=["x", "y"], labels=[0, 0], predicted=[0, 1]))
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap(np.ones(3), np.ones(4))
