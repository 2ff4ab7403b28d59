"""models/weights.py: every supported source gives the same hub-layout backbone, one architecture inference,
strict loading with named keys, pos_embed fitting, and the export + sidecar round trip."""

import numpy as np
import pytest
import torch

from dinov2_repro.models.vision_transformer import DinoVisionTransformer, resize_pos_embed
from dinov2_repro.models.weights import (WeightsError, backbone_state, build_from_export, build_model,
                                         fit_pos_embed, infer_architecture, load_strict, read_weights_file,
                                         sidecar_description, write_export)

TINY = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=4, init_values=1.0)


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return DinoVisionTransformer(**dict(TINY, **overrides)).eval()


def _wrapped_sources(hub):
    """The same backbone as each supported container would store it."""
    other = {k: torch.zeros_like(v) for k, v in hub.items()}  # a student that must not be picked
    return {
        "hub": hub,
        "our checkpoint": {"model": {**{f"teacher.backbone.{k}": v for k, v in hub.items()},
                                     **{f"student.backbone.{k}": v for k, v in other.items()},
                                     "dino_loss.centering.center": torch.zeros(1, 8)}, "iteration": 3},
        "torch.compile": {f"teacher.backbone._orig_mod.{k}": v for k, v in hub.items()},
        "DDP": {f"module.{k}": v for k, v in hub.items()},
        "FSDP1": {f"_fsdp_wrapped_module.{k}": v for k, v in hub.items()},
        "DINO v1": {"teacher": {f"module.backbone.{k}": v for k, v in hub.items()},
                    "student": {f"module.backbone.{k}": v for k, v in other.items()}, "epoch": 4},
        "state_dict nesting": {"state_dict": {f"backbone.{k}": v for k, v in hub.items()}},
    }


def test_every_source_reads_to_the_same_hub_backbone(tmp_path):
    hub = _tiny().state_dict()
    for name, container in _wrapped_sources(hub).items():
        path = tmp_path / "w.pth"
        torch.save(container, path)
        got = backbone_state(read_weights_file(path), name)
        assert set(got) == set(hub), name
        assert all(torch.equal(got[k], hub[k]) for k in hub), name


def test_hugging_face_keys_are_converted():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                                       image_size=32, layerscale_value=1.0)
    hf = transformers.Dinov2Model(config).eval()
    state = backbone_state(hf.state_dict(), "hf")
    ours = build_model(infer_architecture(state, num_heads=2))
    load_strict(ours, state, "hf")  # every tensor placed, none left over
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(x)["x_norm_clstoken"], hf(pixel_values=x).pooler_output,
                               atol=1e-5, rtol=1e-5)


def test_one_architecture_inference_with_one_head_table():
    state = _tiny().state_dict()  # width 128: not a published width
    with pytest.raises(WeightsError, match="width 128 is not a published one.*num_heads"):
        infer_architecture(state)
    arch = infer_architecture(state, num_heads=4)
    assert {k: arch[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "img_size")} == \
        {"embed_dim": 128, "depth": 2, "num_heads": 4, "patch_size": 8, "img_size": 32}
    with pytest.raises(WeightsError, match="not divisible by num_heads=3"):
        infer_architecture(state, num_heads=3)
    published = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=384, depth=1, num_heads=6,
                                      init_values=1.0, num_register_tokens=4, ffn_layer="swiglufused")
    arch = infer_architecture(published.state_dict())
    assert arch["num_heads"] == 6 and arch["num_register_tokens"] == 4 and arch["ffn_layer"] == "swiglufused"
    load_strict(build_model(arch), published.state_dict(), "published")


def test_files_with_python_objects_or_cut_off_are_refused_by_name(tmp_path):
    pickled = tmp_path / "objects.pth"
    torch.save({"cls_token": torch.zeros(1), "rng": np.random.get_state()}, pickled)
    with pytest.raises(WeightsError, match=f"{pickled}: holds Python objects"):
        read_weights_file(pickled)
    cut = tmp_path / "cut.pth"
    torch.save(_tiny().state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=f"{cut}: cannot read"):
        read_weights_file(cut)
    with pytest.raises(WeightsError, match="no such weights file"):
        read_weights_file(tmp_path / "absent.pth")


def test_strict_load_names_missing_unexpected_and_misshapen_keys():
    model, state = _tiny(), dict(_tiny(seed=1).state_dict())
    state.pop("norm.bias")
    state["head.weight"] = torch.zeros(2)
    state["cls_token"] = torch.zeros(1, 1, 64)
    with pytest.raises(WeightsError) as info:
        load_strict(model, state, "src")
    message = str(info.value)
    assert "missing norm.bias" in message and "unexpected head.weight" in message
    assert "cls_token (1, 1, 64) vs (1, 1, 128)" in message
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_fit_pos_embed_resizes_with_the_models_interpolation_and_warns():
    big, small = _tiny(img_size=64), _tiny(img_size=32)
    state = dict(big.state_dict())
    with pytest.warns(UserWarning, match=r"pos_embed \(1, 65, 128\) resized to \(1, 17, 128\)"):
        fit_pos_embed(small, state, "big")
    expected = resize_pos_embed(big.pos_embed.detach(), 4, 4, small.interpolate_offset, small.interpolate_antialias)
    torch.testing.assert_close(state["pos_embed"], expected)
    load_strict(small, state, "big")


def test_export_round_trip_rebuilds_an_unpublished_width(tmp_path):
    model = _tiny(interpolate_offset=0.0, interpolate_antialias=True)
    state = model.state_dict()
    description = sidecar_description(model, state, arch="vit_small", ffn_layer="mlp", layerscale=1e-5, iteration=9)
    assert description["num_heads"] == 4 and description["img_size"] == 32 and description["iteration"] == 9
    write_export(tmp_path / "export", state, description)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["backbone.json", "teacher_backbone.pth"]
    rebuilt = build_from_export(tmp_path / "export")
    assert rebuilt.num_heads == 4 and rebuilt.interpolate_antialias is True and rebuilt.interpolate_offset == 0.0
    x = torch.randn(2, 3, 48, 48)  # another size: exercises the interpolation mode the sidecar carried
    torch.testing.assert_close(rebuilt.forward_features(x)["x_norm_clstoken"],
                               model.forward_features(x)["x_norm_clstoken"])
