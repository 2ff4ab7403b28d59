"""Feature extraction and its on-disk cache (dinov2_repro.eval.features)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.datasets import ImageFileDataset
from dinov2_repro.eval.backbone_spec import describe_module, load_backbone
from dinov2_repro.eval.features import EvalTransform, FeatureSet, cached_features, extract_features

TINY = "random:vit_small/8,embed_dim=32,depth=3,num_heads=2,img_size=32"


def _images(folder, n=6, size=40, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), mode="L").save(path)
        samples.append((str(path), i % 2))
    return ImageFileDataset(samples, ["a", "b"], str(folder))


def _transform(crop=32, mean=(0.5, 0.5, 0.5)):
    return EvalTransform(round(crop / 0.875), crop, mean, (0.25, 0.25, 0.25))


def test_extracted_features_are_the_models_own_outputs(tmp_path):
    model, info = load_backbone(TINY)
    dataset = _images(tmp_path / "img")
    feats = extract_features(model, dataset, _transform(), n_last_blocks=2, batch_size=4)
    assert feats.cls.shape == (6, 2, 32) and feats.patch_mean.shape == (6, 32)
    assert feats.labels.tolist() == [0, 1, 0, 1, 0, 1] and feats.paths == [p for p, _ in dataset.samples]
    images = torch.stack([_transform()(dataset.load_image(i)) for i in range(6)])
    with torch.no_grad():
        out = model.forward_features(images)
    # the last extracted CLS is the model's final (normed) CLS; patch_mean averages its final patch tokens
    torch.testing.assert_close(feats.knn_input(), out["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats.patch_mean, out["x_norm_patchtokens"].mean(1), rtol=1e-5, atol=1e-5)
    x = feats.linear_input(2, True)
    assert x.shape == (6, 3 * 32)
    torch.testing.assert_close(x[:, 32:64], feats.cls[:, 1])  # block order kept: last block's CLS second
    with pytest.raises(ValueError, match="only 2 were extracted"):
        feats.linear_input(3, False)


def test_unreadable_image_is_reported_and_features_stay_aligned(tmp_path):
    model, _ = load_backbone(TINY)
    dataset = _images(tmp_path / "img", n=5)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = ImageFileDataset(dataset.samples[:2] + [(str(bad), 1)] + dataset.samples[2:], ["a", "b"], dataset.root)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        feats = extract_features(model, dataset, _transform(), n_last_blocks=1, batch_size=2)
    assert feats.skipped == [str(bad)]
    assert len(feats) == 5 and str(bad) not in feats.paths
    assert feats.labels.tolist() == [y for p, y in dataset.samples if p != str(bad)]


def test_cache_hits_on_same_inputs_and_recomputes_when_anything_changes(tmp_path):
    model, info = load_backbone(TINY)
    dataset = _images(tmp_path / "img")
    cache = tmp_path / "cache"
    args = dict(n_last_blocks=2, batch_size=4, log=lambda *_: None)

    first, hit = cached_features(model, info, dataset, _transform(), cache, "train", **args)
    assert not hit
    again, hit = cached_features(model, info, dataset, _transform(), cache, "train", **args)
    assert hit
    torch.testing.assert_close(again.cls, first.cls)

    _, hit = cached_features(model, info, dataset, _transform(mean=(0.4, 0.4, 0.4)), cache, "train", **args)
    assert not hit  # transform changed
    _, hit = cached_features(model, info, dataset, _transform(crop=24), cache, "train", **args)
    assert not hit

    with torch.no_grad():
        model.patch_embed.proj.weight.add_(0.1 * torch.randn_like(model.patch_embed.proj.weight))
    new_info = dict(info, weights_sha1=describe_module(model)["weights_sha1"])
    changed, hit = cached_features(model, new_info, dataset, _transform(), cache, "train", **args)
    assert not hit and not torch.allclose(changed.cls, first.cls)  # weights changed

    path = dataset.samples[0][0]
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8), mode="L").save(path)
    os.utime(path, ns=(1, 1))  # a different file (size or mtime differs)
    _, hit = cached_features(model, new_info, dataset, _transform(), cache, "train", **args)
    assert not hit  # image changed
    _, hit = cached_features(model, new_info, dataset, _transform(), cache, "train", **args)
    assert hit


def test_plain_module_features_are_its_forward_output(tmp_path):
    class Pool(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))  # (B, 3)

    dataset = _images(tmp_path / "img", n=3)
    feats = extract_features(Pool(), dataset, _transform(), n_last_blocks=4, batch_size=2)
    assert feats.cls.shape == (3, 1, 3) and feats.patch_mean is None
    with pytest.raises(ValueError, match="no patch tokens"):
        feats.linear_input(1, True)
    assert isinstance(feats.subset([2, 0]), FeatureSet) and feats.subset([2, 0]).paths == [feats.paths[2], feats.paths[0]]
