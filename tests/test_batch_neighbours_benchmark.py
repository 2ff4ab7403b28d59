"""benchmarks/batch_neighbours.py: the share of same-class nearest neighbours in a batch, on known answers."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.batch_neighbours import same_class_neighbour_share  # noqa: E402


def on_circle(angles):
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_pairs_of_other_classes_never_share_and_chance_is_exact():
    # Three tight pairs far apart; each pair holds one image of each class, so every nearest neighbour is of the
    # other class. With the batch = all six rows, a random other row shares the class 2 times in 5.
    x = on_circle(np.array([0.0, 0.05, 2.0, 2.05, 4.0, 4.05]))
    y = np.array([0, 1, 0, 1, 0, 1])
    result = same_class_neighbour_share(x, y, batch=6, n_batches=5)
    assert result["share"] == 0.0
    assert result["chance"] == pytest.approx(0.4)


def test_tight_classes_always_share_and_scale_does_not_matter():
    rng = np.random.default_rng(0)
    centres = on_circle(np.array([0.0, 2.0, 4.0]))
    y = np.repeat([0, 1, 2], 20)
    x = centres[y] + 0.01 * rng.standard_normal((60, 2))
    x *= rng.uniform(0.1, 10.0, (60, 1))  # cosine neighbours: the norm of a row is irrelevant
    result = same_class_neighbour_share(x, y, batch=60, n_batches=3)
    assert result["share"] == 1.0
    assert result["chance"] == pytest.approx(19 / 59)
    # In batches of 4 an image is often its class's only member there, and then its neighbour cannot share it.
    small = same_class_neighbour_share(x, y, batch=4, n_batches=2000)
    assert small["chance"] < small["share"] < 1.0


def test_batch_larger_than_the_set_is_refused():
    with pytest.raises(ValueError, match="batch = 7"):
        same_class_neighbour_share(np.ones((6, 2)), np.zeros(6, int), batch=7, n_batches=1)
