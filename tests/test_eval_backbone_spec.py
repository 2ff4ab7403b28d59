"""Backbone SPECs: random, hub files (name + shapes), training checkpoints, run directories, errors."""

import json

import pytest
import torch

from dinov2_repro.eval.backbone_spec import BackboneSpecError, load_backbone
from dinov2_repro.models.vision_transformer import DinoVisionTransformer


def test_random_spec_builds_the_requested_architecture_deterministically():
    model, info = load_backbone("random:vit_small/8,embed_dim=32,depth=2,num_heads=4,img_size=24")
    assert (model.embed_dim, len(model.blocks), model.num_heads, model.patch_size) == (32, 2, 4, 8)
    assert info["eval_img_size"] == 24 and info["source"] == "random"
    _, again = load_backbone("random:vit_small/8,embed_dim=32,depth=2,num_heads=4,img_size=24")
    assert again["weights_sha1"] == info["weights_sha1"]  # seeded: the same "random" network every time
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("registers", [0, 4])
def test_hub_file_arch_from_name_and_shapes(tmp_path, registers):
    # A 1-block ViT-S/14 at 518 px is enough to check the naming and shape rules (and is cheap).
    torch.manual_seed(0)
    reference = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=384, depth=1, num_heads=6,
                                      init_values=1.0, num_register_tokens=registers,
                                      interpolate_offset=0.0 if registers else 0.1,
                                      interpolate_antialias=bool(registers)).eval()
    name = "dinov2_vits14_reg4_pretrain.pth" if registers else "dinov2_vits14_pretrain.pth"
    torch.save(reference.state_dict(), tmp_path / name)
    model, info = load_backbone(str(tmp_path / name))
    assert info["source"] == "hub_file" and info["img_size"] == 518 and info["num_heads"] == 6
    assert info["eval_img_size"] == 224 and info["num_register_tokens"] == registers
    assert (info["interpolate_offset"], info["interpolate_antialias"]) == ((0.0, True) if registers else (0.1, False))
    x = torch.randn(2, 3, 224, 224)  # pos_embed interpolated from 37x37 to 16x16 as the reference would
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def _tiny_state(seed, **kw):
    torch.manual_seed(seed)
    return DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, **kw).state_dict()


def test_training_checkpoint_uses_teacher_and_config_heads(tmp_path):
    teacher, student = _tiny_state(1), _tiny_state(2)
    model_sd = {**{f"teacher.backbone.{k}": v for k, v in teacher.items()},
                **{f"student.backbone.{k}": v for k, v in student.items()}}
    meta = {"config": {"student": {"num_heads": 4, "embed_dim": 32}, "crops": {"global_crops_size": 32},
                       "data": {"mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]}}}
    torch.save({"model": model_sd, "optimizer": {}, "meta": meta}, tmp_path / "checkpoint_0000010.pth")
    model, info = load_backbone(str(tmp_path / "checkpoint_0000010.pth"))
    assert info["source"] == "training_checkpoint" and info["num_heads"] == 4
    assert info["mean"] == [0.2, 0.2, 0.2] and info["eval_img_size"] == 32
    torch.testing.assert_close(model.state_dict()["blocks.1.mlp.fc2.weight"], teacher["blocks.1.mlp.fc2.weight"])


def test_run_directory_export_and_random_twin(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    state = _tiny_state(3)
    torch.save(state, run / "export" / "teacher_backbone.pth")
    (run / "export" / "backbone.json").write_text(json.dumps(dict(
        arch="vit_small", patch_size=8, num_register_tokens=0, ffn_layer="mlp", img_size=32,
        interpolate_offset=0.1, interpolate_antialias=False, embed_dim=32, depth=2, num_heads=4)))
    (run / "config.yaml").write_text("crops:\n  global_crops_size: 32\ndata:\n  mean: [0.1, 0.1, 0.1]\n"
                                     "  std: [0.2, 0.2, 0.2]\n")
    model, info = load_backbone(str(run))
    assert info["source"] == "export" and info["num_heads"] == 4 and info["std"] == [0.2, 0.2, 0.2]
    torch.testing.assert_close(model.state_dict()["pos_embed"], state["pos_embed"])
    twin, twin_info = load_backbone(f"random:{run}")
    assert twin_info["source"] == "random" and twin_info["mean"] == info["mean"]
    assert twin_info["eval_img_size"] == info["eval_img_size"] == 32
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert twin_info["weights_sha1"] != info["weights_sha1"]


def test_bad_specs_name_the_spec(tmp_path):
    with pytest.raises(BackboneSpecError, match="never downloaded"):
        load_backbone("dinov2_vits14")
    with pytest.raises(BackboneSpecError, match="vit_tiny"):
        load_backbone("random:vit_tiny/16")
    with pytest.raises(BackboneSpecError, match="bad option"):
        load_backbone("random:vit_small/8,width=3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneSpecError, match="not a run directory"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(BackboneSpecError, match="neither export/backbone.json nor a checkpoint"):
        load_backbone(str(tmp_path / "run"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(BackboneSpecError, match="other.pth"):
        load_backbone(str(tmp_path / "other.pth"))


def test_random_twin_starts_from_the_runs_layerscale_init(tmp_path):
    # The baseline for "did pretraining help" is the run's own starting point: LayerScale gammas at the run's
    # init (1e-5 in the recipe), not the 1.0 that hub weights are built with.
    state = _tiny_state(4, init_values=0.5)  # trained gammas: anything but the init
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    torch.save(state, run / "export" / "teacher_backbone.pth")
    (run / "export" / "backbone.json").write_text(json.dumps(dict(
        arch="vit_small", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=4, layerscale=1e-5)))
    loaded, _ = load_backbone(str(run))
    twin, _ = load_backbone(f"random:{run}")
    torch.testing.assert_close(loaded.state_dict()["blocks.0.ls1.gamma"], state["blocks.0.ls1.gamma"])
    torch.testing.assert_close(twin.state_dict()["blocks.1.ls2.gamma"], torch.full((32,), 1e-5))

    meta = {"config": {"student": {"num_heads": 4, "layerscale": 1e-3}}}
    model_sd = {f"teacher.backbone.{k}": v for k, v in state.items()}
    ckpt = tmp_path / "checkpoint_0000010.pth"
    torch.save({"model": model_sd, "optimizer": {}, "meta": meta}, ckpt)
    twin, _ = load_backbone(f"random:{ckpt}")
    torch.testing.assert_close(twin.state_dict()["blocks.0.ls1.gamma"], torch.full((32,), 1e-3))
