"""Fine-tuning pieces: layer-wise lr decay groups, early stopping, train transform, the two presets."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.datasets import ImageFileDataset
from dinov2_repro.eval.backbone_spec import load_backbone
from dinov2_repro.eval.config import default_preset, load_eval_config
from dinov2_repro.eval.finetune import FinetuneClassifier, TrainTransform, build_param_groups, run_finetune

TINY = "random:vit_small/8,embed_dim=32,depth=3,num_heads=2,img_size=32"


def test_layer_decay_multipliers_and_no_weight_decay_on_biases_norms_gammas():
    backbone, _ = load_backbone(TINY)
    model = FinetuneClassifier(backbone, 3, 32, "cls_avgpool")
    groups = build_param_groups(model, layer_decay=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    depth = 3  # multiplier 0.5 ** (L + 1 - layer): embeddings layer 0, block i layer i + 1, head/norm L + 1
    assert by_name["backbone.pos_embed"]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (depth + 1))
    for i in range(depth):
        assert by_name[f"backbone.blocks.{i}.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (depth - i))
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["head.weight"]["lr_multiplier"] == 1.0 and by_name["head.weight"]["wd_multiplier"] == 1.0
    for name in ("head.bias", "backbone.norm.weight", "backbone.blocks.0.ls1.gamma", "backbone.blocks.1.attn.qkv.bias"):
        assert by_name[name]["wd_multiplier"] == 0.0, name
    assert model.head.in_features == 64  # CLS + mean patch token


def _dataset(folder, n_per_class=4, size=36):
    rng = np.random.default_rng(0)
    samples = []
    for k, level in enumerate((30, 200)):
        (folder / str(k)).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            path = folder / str(k) / f"{i}.png"
            Image.fromarray(np.clip(level + rng.normal(0, 5, (size, size)), 0, 255).astype(np.uint8), mode="L").save(path)
            samples.append((str(path), k))
    return ImageFileDataset(samples, ["a", "b"], str(folder))


def test_early_stopping_stops_after_patience_and_keeps_the_best(tmp_path):
    cfg = load_eval_config(default_preset("finetune"), ["finetune.epochs=6", "finetune.patience=1",
                                                         "finetune.lr=1e-12", "finetune.warmup_epochs=0",
                                                         "finetune.batch_size=4", "finetune.drop_path_rate=0.0"]).finetune
    backbone, info = load_backbone(TINY)
    data = _dataset(tmp_path / "d")
    logs = []
    out = run_finetune(backbone, info, data, data, 2, cfg, crop_size=32, resize_size=36, mean=[0.5] * 3, std=[0.25] * 3,
                       checkpoint_path=tmp_path / "best.pth", log=logs.append)
    # lr ~ 0: the model cannot change, so epoch 1 stays the best and patience 1 stops after epoch 2
    assert out["epochs_run"] == 2 and out["best_epoch"] == 1
    assert any("early stop" in line for line in logs)
    assert (tmp_path / "best.pth").is_file()
    assert not any(p.requires_grad for p in backbone.parameters())  # the caller's backbone is left untouched


def test_train_transform_shapes_and_presets():
    image = torch.randint(0, 255, (3, 50, 40), dtype=torch.uint8)
    for mode in ("random_resized", "resize"):
        out = TrainTransform(32, [0.5] * 3, [0.25] * 3, mode=mode, intensity_jitter=0.2)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ref = load_eval_config(default_preset("finetune_reference")).finetune
    assert (ref.optimizer, ref.lr, ref.epochs, ref.train_crop, ref.label_smoothing) == ("adam", 1e-6, 5, "resize", 0.0)
    strong = load_eval_config(default_preset("finetune")).finetune
    assert (strong.optimizer, strong.layer_decay, strong.label_smoothing) == ("adamw", 0.75, 0.1)
    assert strong.lr * strong.batch_size / 256 == pytest.approx(5e-5)  # the scaled peak lr
