"""Linear probe: stacked heads == independent SGD heads, selection on val only, perfect and chance-level features."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dinov2_repro.eval.features import FeatureSet
from dinov2_repro.eval.linear import train_linear_probe
from dinov2_repro.eval.runner import linear_run


def linear_cfg(**kw):
    base = dict(learning_rates=[0.01, 0.1, 1.0], lr_scaling="linear_wrt_256", n_last_blocks=[1], avgpool=[False],
                iterations=60, batch_size=256, momentum=0.9, weight_decay=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def run_cfg(**linear_kw):
    return SimpleNamespace(linear=linear_cfg(**linear_kw), train_fractions=[1.0], seeds=[0], progress=False)


def test_stacked_heads_equal_independent_sgd_heads_with_cosine_schedule():
    torch.manual_seed(0)
    n, d, c = 48, 6, 3
    features = FeatureSet(torch.randn(n, 1, d), None, torch.randint(0, c, (n,)))
    cfg = linear_cfg(iterations=25, batch_size=64)  # full batch: the sample order cannot matter
    probe = train_linear_probe(features, features, c, cfg, seed=3)
    torch.manual_seed(3)
    init = torch.randn(3, d, c) * 0.01  # the heads' documented init, drawn the same way
    for h, lr in enumerate(cfg.learning_rates):
        head = torch.nn.Linear(d, c)
        with torch.no_grad():
            head.weight.copy_(init[h].T)
            head.bias.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr * cfg.batch_size / 256, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iterations, eta_min=0)
        for _ in range(cfg.iterations):
            opt.zero_grad()
            F.cross_entropy(head(features.cls[:, 0]), features.labels).backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(probe.heads[0].weight[h].T.detach(), head.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(probe.heads[0].bias[h, 0].detach(), head.bias.detach(), rtol=1e-4, atol=1e-5)


def _one_hot_features(labels, n_classes, dim, scale=3.0, noise=0.3, flip=False):
    signal = torch.zeros(len(labels), dim)
    target = (n_classes - 1 - labels) if flip else labels
    signal[torch.arange(len(labels)), target] = scale
    return signal + noise * torch.randn(len(labels), dim)


def test_selection_uses_val_never_test():
    # train: CLS and patch tokens both carry the class. val: only patch tokens do (CLS is noise), so the val-best
    # head uses avgpool. test: only CLS carries the class and patch tokens point to the WRONG class, so selecting on
    # test would pick the CLS-only head.
    torch.manual_seed(1)
    c, d = 2, 6
    y = {s: torch.randint(0, c, (n,)) for s, n in (("train", 200), ("val", 100), ("test", 100))}
    feats = {
        "train": FeatureSet(_one_hot_features(y["train"], c, d).unsqueeze(1), _one_hot_features(y["train"], c, d),
                            y["train"]),
        "val": FeatureSet(torch.randn(100, 1, d), _one_hot_features(y["val"], c, d), y["val"]),
        "test": FeatureSet(_one_hot_features(y["test"], c, d).unsqueeze(1),
                           _one_hot_features(y["test"], c, d, flip=True), y["test"]),
    }
    for s in feats:
        feats[s].paths = [f"{s}{i}" for i in range(len(feats[s]))]
    cfg = run_cfg(avgpool=[False, True], learning_rates=[0.05, 0.5], iterations=80)
    result = linear_run(feats, ["a", "b"], cfg, 1.0, 0)
    probe = result["probe"]
    assert result["selection"]["features"] == "cls1+avgpool"
    val_best = probe.val_accuracy.max().item()
    assert result["selection"]["val_accuracy"] == pytest.approx(val_best)
    test_acc = torch.tensor([[float((probe.predict_proba(feats["test"], ci, li).argmax(1) == y["test"]).float().mean())
                              for li in range(2)] for ci in range(2)])
    ci, li = divmod(int(test_acc.argmax()), 2)
    assert probe.choices[ci].name == "cls1"  # selecting on test would have chosen differently...
    assert test_acc.max() > result["test"]["accuracy"] + 0.2  # ...and reported a better number
    c_sel = [ch.name for ch in probe.choices].index("cls1+avgpool")
    lr_sel = probe.learning_rates.index(result["selection"]["lr"])
    assert result["test"]["accuracy"] == pytest.approx(float(test_acc[c_sel, lr_sel]))


def test_perfectly_separable_features_give_accuracy_one():
    torch.manual_seed(2)
    c, d = 4, 8
    feats = {}
    for s, n in (("train", 80), ("val", 20), ("test", 40)):
        y = torch.arange(n) % c
        feats[s] = FeatureSet(_one_hot_features(y, c, d, noise=0.05).unsqueeze(1), None, y, [f"{s}{i}" for i in range(n)])
    result = linear_run(feats, list("abcd"), run_cfg(), 1.0, 0)
    assert result["test"]["accuracy"] == 1.0
    assert result["test"]["macro_avg"]["roc_auc"] == 1.0


def test_shuffled_labels_give_chance_accuracy():
    torch.manual_seed(3)
    c, d = 4, 16
    feats = {s: FeatureSet(torch.randn(n, 1, d), torch.randn(n, d), torch.randint(0, c, (n,)),
                           [f"{s}{i}" for i in range(n)])
             for s, n in (("train", 400), ("val", 100), ("test", 400))}
    result = linear_run(feats, list("abcd"), run_cfg(avgpool=[False, True]), 1.0, 0)
    # chance = 1/4; with 400 test images the std of the accuracy is ~0.022: 0.1 is more than 4 sigma
    assert abs(result["test"]["accuracy"] - 0.25) < 0.1
    assert result["n_train"] == 400


def test_label_fraction_subsets_the_training_features_stratified():
    torch.manual_seed(4)
    y = torch.tensor([0] * 40 + [1] * 20 + [2] * 8)
    feats = {s: FeatureSet(_one_hot_features(y, 3, 4).unsqueeze(1), None, y, [f"{s}{i}" for i in range(len(y))])
             for s in ("train", "val", "test")}
    result = linear_run(feats, list("abc"), run_cfg(iterations=5), 0.25, 7)
    assert result["n_train"] == 10 + 5 + 2  # round(0.25 * n) per class
    assert math.isfinite(result["test"]["accuracy"])
