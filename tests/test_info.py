"""Tests of `dinov2_repro.models.info`: parameter count and fvcore GFLOPs against hand formulas."""

import json

import pytest

from dinov2_repro.models.info import main, model_info

pytest.importorskip("fvcore")


def vit_param_count(dim, depth, patch, n_positions, n_reg=0, mlp_ratio=4):
    """Parameters of a DINOv2 ViT with an MLP FFN and LayerScale, counted tensor by tensor."""
    hidden = mlp_ratio * dim
    patch_embed = dim * 3 * patch * patch + dim
    tokens = dim + dim + n_positions * dim + n_reg * dim  # cls, mask, pos_embed, registers
    block = (
        2 * dim  # norm1
        + 3 * dim * dim + 3 * dim  # qkv
        + dim * dim + dim  # proj
        + dim  # ls1
        + 2 * dim  # norm2
        + hidden * dim + hidden  # fc1
        + dim * hidden + dim  # fc2
        + dim  # ls2
    )
    return patch_embed + tokens + depth * block + 2 * dim


def test_vits14_224_parameters_and_flops():
    info = model_info("vit_small", patch_size=14, img_size=224)
    expected_params = vit_param_count(384, 12, 14, 1 + 16 * 16)
    assert info["params"] == expected_params == 21_629_184
    assert 21.5e6 < info["params"] < 22.5e6
    assert info["n_patch_tokens"] == 256 and info["n_tokens"] == 257

    # fvcore conventions: 1 multiply-add = 1 flop, LayerNorm 5 per element, element-wise ops free.
    d, t, n = 384, 257, 256
    conv = n * d * 3 * 14 * 14
    per_block = 12 * t * d * d + 2 * t * t * d  # qkv + proj + fc1 + fc2, then q k^T and attn v
    layer_norms = 25 * 5 * t * d  # two per block and the final one
    assert info["gflops"] * 1e9 == pytest.approx(conv + 12 * per_block + layer_norms, rel=1e-9)
    assert 6.0 < info["gflops"] < 6.3


def test_published_vits14_count_and_cli_json(capsys):
    # The published ViT-S/14 keeps its 518 px pos_embed (1 + 37 * 37 rows): the often quoted 22.06M.
    assert main(["--arch", "vit_small", "--img-size", "518", "--num-register-tokens", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["params"] == vit_param_count(384, 12, 14, 1 + 37 * 37, n_reg=4) == 22_058_112
    assert printed["n_tokens"] == 1 + 4 + 37 * 37 and printed["arch"] == "vit_small"
    assert "multiply-add" in printed["flop_convention"]


def test_cli_rejects_size_not_multiple_of_patch(capsys):
    with pytest.raises(SystemExit):
        main(["--img-size", "225"])
    assert "225" in capsys.readouterr().err
