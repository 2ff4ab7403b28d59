"""Weighted k-NN: hand-computed votes, chunked == unchunked, k clipping, selection on val."""

import math
from types import SimpleNamespace

import pytest
import torch

from dinov2_repro.eval.features import FeatureSet
from dinov2_repro.eval.knn import _faiss_available, effective_ks, knn_probabilities, nearest_neighbours, select_k
from dinov2_repro.eval.runner import knn_run


def test_weighted_votes_match_hand_computation():
    train = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.8, 0.6]])  # first row is not unit-norm: it gets normalised
    labels = torch.tensor([0, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    probs = knn_probabilities(train, labels, query, ks=[2, 3], n_classes=2, temperature=0.07)
    # cosine similarities to the query: 1.0 (class 0), 0.0 (class 1), 0.8 (class 0)
    assert probs[2].tolist() == [[1.0, 0.0]]  # the 2 nearest are both class 0
    w0, w1 = math.exp(1 / 0.07) + math.exp(0.8 / 0.07), math.exp(0.0)
    assert probs[3][0, 1].item() == pytest.approx(w1 / (w0 + w1), rel=1e-5)
    assert probs[3].sum().item() == pytest.approx(1.0)


def test_chunked_equals_single_chunk_and_clipped_ks():
    torch.manual_seed(0)
    train, labels, query = torch.randn(50, 8), torch.randint(0, 3, (50,)), torch.randn(17, 8)
    ks = effective_ks([10, 20, 100, 200], len(train))
    assert ks == [10, 20, 50]
    one = knn_probabilities(train, labels, query, ks, n_classes=3, chunk_size=1024)
    many = knn_probabilities(train, labels, query, ks, n_classes=3, chunk_size=4)
    for k in ks:
        torch.testing.assert_close(one[k], many[k])
    with pytest.raises(ValueError, match="exceeds"):
        knn_probabilities(train, labels, query, [51], n_classes=3)


@pytest.mark.skipif(_faiss_available(), reason="faiss is installed")
def test_faiss_backend_without_faiss_is_a_clear_error():
    with pytest.raises(ImportError, match="faiss"):
        knn_probabilities(torch.randn(5, 2), torch.zeros(5, dtype=torch.long), torch.randn(2, 2), [1], 2,
                          backend="faiss")


def test_select_k_prefers_val_accuracy_then_smaller_k():
    labels = torch.tensor([0, 1])
    right, wrong = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    k, acc = select_k({10: wrong, 20: right, 100: right}, labels)
    assert k == 20 and acc == {10: 0.5, 20: 1.0, 100: 1.0}


def _feats(n, labels_fn, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = labels_fn(n)
    x = torch.randn(n, d, generator=g) * 0.1
    x[torch.arange(n), y] += 1.0  # class direction + small noise: perfectly separable by cosine
    return FeatureSet(x.unsqueeze(1), None, y, [str(i) for i in range(n)])


def test_knn_run_separable_is_perfect_and_random_labels_are_chance():
    cfg = SimpleNamespace(knn=SimpleNamespace(ks=[10, 20, 100, 200], temperature=0.07, chunk_size=64, backend="torch"))
    cyc = lambda n: torch.arange(n) % 4  # noqa: E731
    feats = {"train": _feats(120, cyc, seed=1), "val": _feats(40, cyc, seed=2), "test": _feats(40, cyc, seed=3)}
    result = knn_run(feats, list("abcd"), cfg, 1.0, 0)
    assert result["test"]["accuracy"] == 1.0
    assert result["selection"]["ks"] == [10, 20, 100, 120]  # 200 clipped to the 120 training samples
    torch.manual_seed(5)
    rand = lambda n: torch.randint(0, 4, (n,))  # noqa: E731
    noise = {s: FeatureSet(torch.randn(n, 1, 16), None, rand(n), [str(i) for i in range(n)])
             for s, n in (("train", 400), ("val", 100), ("test", 400))}
    result = knn_run(noise, list("abcd"), cfg, 1.0, 0)
    assert abs(result["test"]["accuracy"] - 0.25) < 0.1  # 400 test images: std ~0.022


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nearest_neighbours_are_the_most_similar_reference_rows(backend):
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    query = torch.tensor([[0.0, 5.0], [3.0, 2.9], [2.0, 0.1]])
    cosine, index = nearest_neighbours(reference, query, k=2, backend=backend)
    assert index.tolist() == [[1, 2], [2, 0], [0, 2]]
    assert cosine[:, 0].tolist() == pytest.approx([1.0, 0.99994, 0.99875], abs=1e-4)
    assert nearest_neighbours(reference, query, k=9, backend=backend)[1].shape == (3, 3)  # k clipped
