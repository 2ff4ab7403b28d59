"""Gated attention-MIL: on bags where a positive bag holds one planted positive instance among negatives, the
model learns the bag labels and puts its attention on the planted instance."""

import torch

from dinov2_repro.eval.mil import GatedAttentionMIL, predict_mil, train_mil


def planted_bags(n_bags: int, seed: int, dim: int = 16):
    """Bags of 10-30 Gaussian instances; half are positive, with one instance (at a random place) shifted along a
    fixed direction. Returns (bags, labels, planted index or -1)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(dim)
    direction[:4] = 3.0  # 6 standard deviations along its unit vector: the planted instance is unambiguous
    bags, labels, planted = [], [], []
    for b in range(n_bags):
        bag = torch.randn(int(torch.randint(10, 31, (1,), generator=g)), dim, generator=g)
        where = -1
        if b % 2:
            where = int(torch.randint(0, bag.shape[0], (1,), generator=g))
            bag[where] += direction
        bags.append(bag)
        labels.append(b % 2)
        planted.append(where)
    return bags, labels, planted


def test_shapes_and_attention_sums_to_one():
    logits, attention = GatedAttentionMIL(8, n_classes=3, hidden=16, attention_dim=8)(torch.randn(5, 8))
    assert logits.shape == (3,) and attention.shape == (5,)
    assert torch.allclose(attention.sum(), torch.tensor(1.0))


def test_attention_goes_to_the_planted_positive_instance():
    bags, labels, _ = planted_bags(80, seed=0)
    model = train_mil(bags, labels, epochs=15, lr=1e-3, seed=0,
                      model=GatedAttentionMIL(16, hidden=32, attention_dim=16, dropout=0.0))
    test_bags, test_labels, planted = planted_bags(40, seed=1)
    out = predict_mil(model, test_bags)
    positive = [p[1].item() for p, y in zip(out["probabilities"], test_labels) if y == 1]
    negative = [p[1].item() for p, y in zip(out["probabilities"], test_labels) if y == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    assert sum(pairs) / len(pairs) > 0.9  # AUC
    hits = [int(a.argmax()) == where for a, where in zip(out["attention"], planted) if where >= 0]
    assert sum(hits) / len(hits) >= 0.9
    weight = [a[where].item() for a, where in zip(out["attention"], planted) if where >= 0]
    assert sum(weight) / len(weight) > 0.5  # most of the weight, against a uniform 1/10-1/30
