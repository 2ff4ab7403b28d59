"""Tests of the hub entry points (hub.py, hubconf.py), the state-dict converters (models/convert.py) and the
weights module's reading of them (models/weights.py)."""

import importlib.util
import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch

from dinov2_repro import hub
from dinov2_repro.models import DinoVisionTransformer
from dinov2_repro.models.convert import convert_hf_state_dict
from dinov2_repro.models.weights import WeightsError, backbone_state, infer_architecture, read_hf_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(depth=1, img_size=28)  # hub entry points with a 1-block, 2 x 2-patch model


# ---------------------------------------------------------------------------------------------- hub entry points
def test_hub_entry_builds_published_architecture():
    model = hub.dinov2_vits14(pretrained=False)
    assert model.embed_dim == 384 and model.n_blocks == 12 and model.patch_size == 14
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert model.register_tokens is None
    assert model.interpolate_offset == 0.1 and model.interpolate_antialias is False
    assert torch.all(model.blocks[0].ls1.gamma == 1.0)
    giant = hub.dinov2_vitg14_reg(pretrained=False, **SMALL)
    assert giant.blocks[0].mlp.w12.weight.shape == (8192, 1536) and giant.register_tokens.shape == (1, 4, 1536)
    assert giant.interpolate_offset == 0.0 and giant.interpolate_antialias is True


def test_published_urls():
    assert hub.hub_weights_url("vit_small") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth")
    assert hub.hub_weights_url("vit_giant2", 14, 4) == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth")


def test_pretrained_path_loads_strictly(tmp_path):
    source = hub.dinov2_vits14_reg(pretrained=False, **SMALL)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = hub.dinov2_vits14_reg(pretrained=str(path), **SMALL)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    extra = dict(source.state_dict(), **{"head.weight": torch.zeros(1)})
    torch.save(extra, path)
    with pytest.raises(WeightsError, match="unexpected.*head.weight"):
        hub.dinov2_vits14_reg(pretrained=str(path), **SMALL)
    with pytest.raises(WeightsError, match="missing.pth"):
        hub.dinov2_vits14_reg(pretrained=str(tmp_path / "missing.pth"), **SMALL)


def test_pretrained_path_accepts_training_checkpoint(tmp_path):
    teacher = hub.dinov2_vits14(pretrained=False, **SMALL)
    student = hub.dinov2_vits14(pretrained=False, **SMALL)
    checkpoint = {"model": {**{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
                            **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
                            "teacher.dino_head.last_layer.weight": torch.zeros(3, 3)},
                  "iteration": 7}
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    loaded = hub.dinov2_vits14(pretrained=tmp_path / "ckpt.pth", **SMALL)
    torch.testing.assert_close(loaded.pos_embed, teacher.pos_embed)


def test_pretrained_true_offline_is_a_clear_error_and_cache_is_used(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        hub.dinov2_vits14_reg(pretrained=True, **SMALL)
    message = str(info.value)
    assert "dinov2_vits14_reg4_pretrain.pth" in message
    assert str(tmp_path / "checkpoints") in message and "pretrained=" in message
    assert calls == ["https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"]

    # once the file is in the cache directory, no download is attempted
    published = hub.dinov2_vits14_reg(pretrained=False, **SMALL).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(published, tmp_path / "checkpoints" / "dinov2_vits14_reg4_pretrain.pth")
    model = hub.dinov2_vits14_reg(pretrained=True, **SMALL)
    assert torch.equal(model.register_tokens, published["register_tokens"]) and len(calls) == 1


def test_pretrained_pos_embed_is_resized_to_a_smaller_img_size(tmp_path):
    torch.manual_seed(1)
    trained = hub.dinov2_vits14(pretrained=False, depth=1, img_size=56)  # 4 x 4 grid
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="pos_embed"):
        small = hub.dinov2_vits14(pretrained=str(tmp_path / "w.pth"), depth=1, img_size=28)  # 2 x 2 grid
    assert small.pos_embed.shape == (1, 5, 384)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():  # same result as the big-pos-embed model interpolating on the fly
        torch.testing.assert_close(small.eval()(x), trained.eval()(x), atol=1e-5, rtol=1e-5)


def test_torch_hub_load_local_repo():
    model = torch.hub.load(str(REPO_ROOT), "dinov2_vits14", source="local", pretrained=False, **SMALL)
    assert isinstance(model, DinoVisionTransformer) and model.embed_dim == 384
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    assert all(getattr(hubconf, name) is entry for name, entry in hub.ENTRY_POINTS.items())
    assert len(hub.ENTRY_POINTS) == 8


# ---------------------------------------------------------------------------------------------- training checkpoints
def test_hub_layout_from_training_checkpoint_selects_and_flattens():
    sd = {
        "teacher.backbone.cls_token": torch.ones(1),
        "teacher.backbone.blocks.1.6.norm1.weight": torch.full((1,), 2.0),  # reference block chunks
        "teacher.backbone._orig_mod.norm.bias": torch.full((1,), 3.0),  # torch.compile wrapper
        "teacher.dino_head.mlp.0.weight": torch.zeros(1),
        "student.backbone.cls_token": torch.zeros(1),
    }
    hub_keys = {"pos_embed": torch.zeros(1, 5, 1), "patch_embed.proj.weight": torch.zeros(1, 3, 2, 2)}
    sd.update({f"{who}.backbone.{k}": v for k, v in hub_keys.items() for who in ("teacher", "student")})
    out = backbone_state(sd, "ckpt")
    assert set(out) == {"cls_token", "blocks.6.norm1.weight", "norm.bias", *hub_keys}
    assert out["blocks.6.norm1.weight"].item() == 2.0 and out["cls_token"].item() == 1.0  # the teacher's
    assert set(backbone_state(sd, "ckpt", prefix="student.backbone.")) == {"cls_token", *hub_keys}
    with pytest.raises(WeightsError, match="student.backbone"):
        backbone_state({"student.backbone.cls_token": torch.zeros(1)}, "ckpt", prefix="teacher.backbone.")


@pytest.mark.parametrize("builder, depth", [(hub.dinov2_vits14_reg, 3), (hub.dinov2_vitg14, 1)])
def test_infer_arch_round_trip(builder, depth):
    model = builder(pretrained=False, depth=depth, img_size=42)
    arch = infer_architecture(model.state_dict())
    assert arch["depth"] == depth and arch["img_size"] == 42 and arch["patch_size"] == 14
    assert arch["num_heads"] == model.num_heads and arch["embed_dim"] == model.embed_dim
    assert arch["num_register_tokens"] == model.num_register_tokens
    rebuilt = DinoVisionTransformer(**arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------- Hugging Face
def _randomized_hf(kind, **config_kwargs):
    transformers = pytest.importorskip("transformers")
    if kind == "registers":
        if not hasattr(transformers, "Dinov2WithRegistersModel"):
            pytest.skip("this transformers has no Dinov2WithRegistersModel")
        config_class, model_class = transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel
    else:
        config_class, model_class = transformers.Dinov2Config, transformers.Dinov2Model
    config = config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
                          layerscale_value=0.5, **config_kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(11)
    model = model_class(config).eval()
    with torch.no_grad():  # every tensor random, so a mis-mapped key cannot hide behind an init value
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def _compare_with_hf(hf_model, ours, n_reg, size=28, masks=None):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        hf_tokens = hf_model(pixel_values=x, bool_masked_pos=masks).last_hidden_state
        out = ours.forward_features(x, masks)
    torch.testing.assert_close(out["x_norm_clstoken"], hf_tokens[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], hf_tokens[:, 1:1 + n_reg], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], hf_tokens[:, 1 + n_reg:], atol=1e-5, rtol=1e-5)


HF_CASES = {
    "mlp": ("plain", dict(), dict(ffn_layer="mlp", num_register_tokens=0)),
    "swiglu": ("plain", dict(use_swiglu_ffn=True), dict(ffn_layer="swiglufused", num_register_tokens=0)),
    "registers": ("registers", dict(num_register_tokens=3), dict(ffn_layer="mlp", num_register_tokens=3)),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_in_memory_state_dict_converts_and_matches_outputs(case):
    kind, hf_kwargs, our_kwargs = HF_CASES[case]
    hf_model = _randomized_hf(kind, **hf_kwargs)
    ours = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                                 **our_kwargs).eval()
    ours.load_state_dict(convert_hf_state_dict(hf_model.state_dict()), strict=True)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    _compare_with_hf(hf_model, ours, our_kwargs["num_register_tokens"])
    _compare_with_hf(hf_model, ours, our_kwargs["num_register_tokens"], masks=masks)


@pytest.mark.parametrize("case, file_format", [("swiglu", "safetensors"), ("registers", "bin")])
def test_hf_folder_round_trip(tmp_path, case, file_format):
    kind, hf_kwargs, _ = HF_CASES[case]
    hf_model = _randomized_hf(kind, **hf_kwargs)
    hf_model.save_pretrained(tmp_path)  # the published on-disk names (attention.attention.query, weights_in ...)
    if file_format == "bin":
        from safetensors.torch import load_file

        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
        (tmp_path / "model.safetensors").unlink()
    hub_sd, arch = read_hf_folder(tmp_path)
    assert arch["embed_dim"] == 32 and arch["depth"] == 2 and arch["num_heads"] == 2 and arch["img_size"] == 28
    assert arch["init_values"] == 0.5 and arch["ffn_layer"] == HF_CASES[case][2]["ffn_layer"]
    ours = DinoVisionTransformer(**arch).eval()
    ours.load_state_dict(hub_sd, strict=True)
    _compare_with_hf(hf_model, ours, arch["num_register_tokens"])
    inferred = infer_architecture(hub_sd, num_heads=2)
    assert {k: inferred[k] for k in arch} == {**arch, "init_values": 1.0}  # only LayerScale's presence is stored
    with pytest.raises(WeightsError, match="num_heads"):
        infer_architecture(hub_sd)  # 32 wide: no published variant, so no guess


def test_hf_interpolation_matches_explicit_size_mode_without_antialias():
    """HF resizes with an explicit size and no antialias: our offset-0 mode must give the same tokens."""
    hf_model = _randomized_hf("plain")
    ours = DinoVisionTransformer(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1.0,
                                 interpolate_offset=0.0, interpolate_antialias=False).eval()
    ours.load_state_dict(convert_hf_state_dict(hf_model.state_dict()), strict=True)
    _compare_with_hf(hf_model, ours, 0, size=49)


def test_hf_unknown_or_incomplete_keys_are_named():
    hf_sd = _randomized_hf("plain").state_dict()
    prefixed = {f"dinov2.{k}": v for k, v in hf_sd.items()}
    assert set(convert_hf_state_dict(prefixed)) == set(convert_hf_state_dict(hf_sd))
    with pytest.raises(KeyError, match="classifier.weight"):
        convert_hf_state_dict({**prefixed, "classifier.weight": torch.zeros(2, 64)})
    # the key projection of layer 1, under either naming (transformers < 5: attention.attention.key; >= 5: k_proj)
    key_proj = next(k for k in hf_sd if re.fullmatch(r"encoder\.layer\.1\.attention\.(attention\.key|k_proj)\.weight", k))
    incomplete = {k: v for k, v in hf_sd.items() if k != key_proj}
    with pytest.raises(KeyError, match=r"encoder.layer.1.*attn.qkv"):
        convert_hf_state_dict(incomplete)


def test_hf_folder_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          patch_size=7, image_size=28, hidden_act="relu")))
    with pytest.raises(WeightsError, match="hidden_act"):
        read_hf_folder(tmp_path)
