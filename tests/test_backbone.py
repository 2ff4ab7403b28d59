"""Tests of the ViT backbone: shapes, published key layout, pos-embed interpolation, mask token, stochastic depth,
list forward, intermediate layers, initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2_repro.layers import Attention, Block, drop_add_residual_stochastic_depth, swiglu_hidden_features
from dinov2_repro.models import DinoVisionTransformer, build_backbone, vit_base, vit_giant2, vit_large, vit_small


def tiny_vit(**overrides):
    options = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
    options.update(overrides)
    return DinoVisionTransformer(**options)


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "factory, dim, heads",
    [(vit_small, 384, 6), (vit_base, 768, 12), (vit_large, 1024, 16), (vit_giant2, 1536, 24)],
)
@pytest.mark.parametrize("n_reg", [0, 4])
def test_variant_output_shapes(factory, dim, heads, n_reg):
    model = factory(patch_size=14, depth=1, img_size=28, num_register_tokens=n_reg).eval()
    assert model.embed_dim == dim and model.num_heads == heads and model.blocks[0].attn.num_heads == heads
    assert model.n_blocks == len(model.blocks) == 1
    x = torch.randn(2, 3, 28, 42)  # non-square: 2 x 3 patches
    masks = torch.zeros(2, 6, dtype=torch.bool)
    with torch.no_grad():
        out = model.forward_features(x, masks)
        cls = model(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, dim)
    assert out["x_norm_regtokens"].shape == (2, n_reg, dim)
    assert out["x_norm_patchtokens"].shape == (2, 6, dim)
    assert out["x_prenorm"].shape == (2, 1 + n_reg + 6, dim)
    assert out["masks"] is masks
    torch.testing.assert_close(cls, out["x_norm_clstoken"])


def test_build_backbone_by_name_and_bad_name():
    model = build_backbone("vit_small", patch_size=14, depth=1, img_size=28, num_register_tokens=2)
    assert model.embed_dim == 384 and model.patch_size == 14 and model.register_tokens.shape == (1, 2, 384)
    with pytest.raises(ValueError, match="vit_tiny"):
        build_backbone("vit_tiny")


def test_input_not_multiple_of_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="30x28"):
        tiny_vit()(torch.randn(1, 3, 30, 28))


# ---------------------------------------------------------------------------------------------- published layout
def published_layout(dim, depth, patch, n_positions, ffn_shapes, n_reg=0):
    """Key -> shape of a published DINOv2 hub backbone (recipe section 4), written out by hand."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, n_positions, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if n_reg:
        shapes["register_tokens"] = (1, n_reg, dim)
    for i in range(depth):
        block = {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "ls2.gamma": (dim,),
            **ffn_shapes,
        }
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


VITS14_FFN = {"mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536),
              "mlp.fc2.bias": (384,)}
VITG14_FFN = {"mlp.w12.weight": (8192, 1536), "mlp.w12.bias": (8192,), "mlp.w3.weight": (1536, 4096),
              "mlp.w3.bias": (1536,)}


@pytest.mark.parametrize(
    "build, expected",
    [
        # ViT-S/14 trained at 518: 1 + 37*37 = 1370 positions, qkv (1152, 384).
        (lambda: vit_small(patch_size=14, img_size=518, init_values=1.0),
         published_layout(384, 12, 14, 1370, VITS14_FFN)),
        (lambda: vit_small(patch_size=14, img_size=518, init_values=1.0, num_register_tokens=4, depth=2),
         published_layout(384, 2, 14, 1370, VITS14_FFN, n_reg=4)),
        # ViT-g/14, one block: SwiGLU packed w12 (8192, 1536), w3 (1536, 4096).
        (lambda: vit_giant2(patch_size=14, img_size=518, init_values=1.0, depth=1),
         published_layout(1536, 1, 14, 1370, VITG14_FFN)),
    ],
    ids=["vits14", "vits14_reg4", "vitg14_depth1"],
)
def test_strict_load_of_published_layout(build, expected):
    model = build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    published = {k: torch.randn(shape) for k, shape in expected.items()}
    model.load_state_dict(published, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, published[key]), key


def test_swiglu_hidden_rounding_matches_giant2():
    assert swiglu_hidden_features(4 * 1536) == 4096
    assert swiglu_hidden_features(4 * 32) == 88  # int(128 * 2/3) = 85 -> next multiple of 8
    model = tiny_vit(ffn_layer="swiglu")
    assert model.blocks[0].mlp.w12.weight.shape == (176, 32) and model.blocks[0].mlp.w3.weight.shape == (32, 88)


def test_no_layerscale_when_init_values_is_none():
    keys = tiny_vit(init_values=None).state_dict().keys()
    assert not any("ls1" in k or "ls2" in k for k in keys)


# ---------------------------------------------------------------------------------------------- interpolation
def test_pos_embed_identity_when_grid_matches():
    model = tiny_vit()
    x = torch.zeros(1, 17, 32)
    assert model.interpolate_pos_encoding(x, 28, 28) is model.pos_embed
    assert model.interpolate_pos_encoding(x, 34, 30) is model.pos_embed  # still a 4 x 4 patch grid


@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True), (0.0, False)])
@pytest.mark.parametrize("height, width", [(35, 21), (49, 63), (21, 21)])
def test_pos_embed_interpolation_keeps_orientation(offset, antialias, height, width):
    """A pos-embed varying only along rows must still vary only along rows after resizing (and vice versa)."""
    model = tiny_vit(interpolate_offset=offset, interpolate_antialias=antialias)
    side, grid_h, grid_w = 4, height // 7, width // 7
    ramp = torch.arange(side, dtype=torch.float32)
    for along_rows in (True, False):
        grid = ramp[:, None].expand(side, side) if along_rows else ramp[None, :].expand(side, side)
        with torch.no_grad():
            model.pos_embed[0, 0] = -5.0
            model.pos_embed[0, 1:] = grid.reshape(-1, 1).expand(-1, 32)
        pos = model.interpolate_pos_encoding(torch.zeros(1, 1, 32), height, width)
        assert pos.shape == (1, 1 + grid_h * grid_w, 32)
        assert torch.all(pos[0, 0] == -5.0)  # CLS position is never resized
        resized = pos[0, 1:, 0].reshape(grid_h, grid_w)
        if along_rows:
            torch.testing.assert_close(resized, resized[:, :1].expand_as(resized))
            assert grid_h == 1 or torch.all(resized[1:, 0] > resized[:-1, 0])
        else:
            torch.testing.assert_close(resized, resized[:1, :].expand_as(resized))
            assert grid_w == 1 or torch.all(resized[0, 1:] > resized[0, :-1])


def test_pos_embed_interpolation_modes_follow_the_reference_formulas():
    torch.manual_seed(1)
    original = tiny_vit(interpolate_offset=0.1)
    registers = tiny_vit(interpolate_offset=0.0, interpolate_antialias=True)
    registers.load_state_dict(original.state_dict())
    patch_grid = original.pos_embed[:, 1:].detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    height, width = 35, 63  # 5 x 9 patches
    x = torch.zeros(1, 1, 32)

    expected_a = F.interpolate(patch_grid, scale_factor=(5.1 / 4, 9.1 / 4), mode="bicubic", antialias=False)
    expected_b = F.interpolate(patch_grid, size=(5, 9), mode="bicubic", antialias=True)
    got_a = original.interpolate_pos_encoding(x, height, width)[0, 1:].detach()
    got_b = registers.interpolate_pos_encoding(x, height, width)[0, 1:].detach()
    torch.testing.assert_close(got_a, expected_a.permute(0, 2, 3, 1).reshape(45, 32))
    torch.testing.assert_close(got_b, expected_b.permute(0, 2, 3, 1).reshape(45, 32))
    assert not torch.allclose(got_a, got_b, atol=1e-4)  # the two modes are really different


def test_pos_embed_interpolation_output_dtype_follows_tokens():
    pos = tiny_vit().interpolate_pos_encoding(torch.zeros(1, 1, 32, dtype=torch.bfloat16), 35, 21)
    assert pos.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- mask token
def test_mask_token_replaces_patch_embedding_before_pos_embed():
    model = tiny_vit(num_register_tokens=2)
    with torch.no_grad():
        model.mask_token.normal_()
        model.register_tokens.normal_()
    x = torch.randn(2, 3, 35, 21)  # 5 x 3 patches: pos-embed is interpolated
    masks = torch.zeros(2, 15, dtype=torch.bool)
    masks[0, [0, 4, 14]] = True
    masks[1, 7] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    pos = model.interpolate_pos_encoding(tokens, 35, 21)[0]  # (1 + 15, D)
    patches = model.patch_embed(x)
    assert tokens.shape == (2, 1 + 2 + 15, 32)
    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], model.cls_token[0, 0] + pos[0])
        torch.testing.assert_close(tokens[b, 1:3], model.register_tokens[0])  # registers get no position
        for j in range(15):
            content = model.mask_token[0] if masks[b, j] else patches[b, j]
            torch.testing.assert_close(tokens[b, 3 + j], content + pos[1 + j])
    tokens.sum().backward()  # no in-place write on a leaf; the mask token receives the gradient of 4 tokens
    torch.testing.assert_close(model.mask_token.grad, torch.full_like(model.mask_token, 4.0))


def test_mask_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="masks shape"):
        tiny_vit().forward_features(torch.randn(2, 3, 28, 28), torch.zeros(2, 15, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- stochastic depth
def test_eval_mode_never_drops_paths():
    model = tiny_vit(drop_path_rate=0.5, drop_path_uniform=True).eval()
    no_drop = tiny_vit(drop_path_rate=0.0).eval()
    no_drop.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        first, second, reference = model(x), model(x), no_drop(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference)


def test_train_mode_with_high_drop_rate_is_stochastic():
    model = tiny_vit(drop_path_rate=0.5, drop_path_uniform=True).train()
    x = torch.randn(8, 3, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_drop_path_rates_uniform_or_linear():
    uniform = tiny_vit(depth=4, drop_path_rate=0.3, drop_path_uniform=True)
    linear = tiny_vit(depth=4, drop_path_rate=0.3, drop_path_uniform=False)
    assert [b.sample_drop_ratio for b in uniform.blocks] == pytest.approx([0.3] * 4)
    assert [b.sample_drop_ratio for b in linear.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_batch_subset_drop_path_single_draw_and_expectation():
    torch.manual_seed(3)
    batch, ratio = 10, 0.5
    x = torch.rand(batch, 3, 4) + 0.5

    def residual(t):  # depends on the sample: checks that the subset is scattered back to the right rows
        return 2.0 * t

    added_sum = torch.zeros_like(x)
    draws = 2000
    for _ in range(draws):
        added = drop_add_residual_stochastic_depth(x, residual, ratio) - x
        kept_rows = added.flatten(1).abs().sum(1) > 0
        assert kept_rows.sum() == 5  # floor(10 * (1 - 0.5))
        # kept rows get the branch scaled by B / subset = 2
        torch.testing.assert_close(added[kept_rows], 2.0 * residual(x[kept_rows]))
        added_sum += added
    # E[added] = residual(x): same expectation as per-sample drop path
    ratio_to_residual = (added_sum / draws) / residual(x)
    assert torch.all((ratio_to_residual - 1).abs() < 0.15)
    assert abs(ratio_to_residual.mean().item() - 1) < 0.02


def test_batch_subset_keeps_at_least_one_sample():
    x = torch.ones(4, 2, 3)
    added = drop_add_residual_stochastic_depth(x, lambda t: t, 0.95) - x
    assert (added.flatten(1).abs().sum(1) > 0).sum() == 1
    torch.testing.assert_close(added.sum(), torch.tensor(4.0 * 6))  # one row of ones, scaled by 4 / 1


@pytest.mark.parametrize("rate, n_subset", [(0.5, 4), (0.1, None)])
def test_block_drops_whole_residual_per_sample(rate, n_subset):
    """Train mode: every sample gets either no attention branch or the branch scaled by 1/keep."""
    torch.manual_seed(5)
    block = Block(dim=16, num_heads=2, qkv_bias=True, init_values=1.0, drop_path=rate)
    with torch.no_grad():
        block.ls2.gamma.zero_()  # isolate the attention branch
    x = torch.randn(8, 5, 16)
    with torch.no_grad():
        branch = block.eval().attn_residual(x)  # attention mixes tokens within a sample only
    block.train()
    for _ in range(5):
        with torch.no_grad():
            out = block(x)
        changed = 0
        for b in range(8):
            if torch.allclose(out[b], x[b]):
                continue
            changed += 1
            scale = 8 / n_subset if n_subset else 1 / (1 - rate)
            torch.testing.assert_close(out[b], x[b] + scale * branch[b])
        if n_subset:  # the batch-subset path keeps exactly floor(B * (1 - rate)) samples every time
            assert changed == n_subset


# ---------------------------------------------------------------------------------------------- fast == reference
def test_sdpa_attention_matches_naive_attention():
    torch.manual_seed(2)
    attn = Attention(dim=16, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 7, 16)
    q, k, v = attn.qkv(x).reshape(3, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    reference = attn.proj((weights @ v).transpose(1, 2).reshape(3, 7, 16))
    torch.testing.assert_close(attn(x), reference, atol=1e-5, rtol=1e-5)


def test_an_xformers_that_imports_but_cannot_run_on_the_gpu_is_not_chosen(monkeypatch):
    # xformers 0.0.35's wheel on torch 2.11 imports, then has no CUDA operator (seen on an H200): "auto" must
    # keep SDPA, and an explicit "xformers" must fail at construction naming why.
    from dinov2_repro.layers import attention

    reason = "xformers is installed but its attention does not run on this GPU (NotImplementedError: x)"
    monkeypatch.setattr(attention, "xformers_import_problem", lambda: "")
    monkeypatch.setattr(attention, "xformers_cuda_problem", lambda: reason)
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: True)
    assert attention.resolve_attn_backend("auto") == "sdpa"
    with pytest.raises(ImportError, match="does not run on this GPU"):
        attention.resolve_attn_backend("xformers")
    monkeypatch.setattr(attention, "xformers_cuda_problem", lambda: "")  # a working build on a GPU
    assert attention.resolve_attn_backend("auto") == "xformers"
    monkeypatch.setattr(attention.torch.cuda, "is_available", lambda: False)  # no GPU: the forward is SDPA
    assert attention.resolve_attn_backend("auto") == "sdpa"
    assert attention.resolve_attn_backend("xformers") == "xformers"


def test_attention_backend_choices():
    with pytest.raises(ValueError, match="flash"):
        Attention(16, 2, backend="flash")
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="xformers"):
            tiny_vit(attn_backend="xformers")
    auto, sdpa = tiny_vit(attn_backend="auto").eval(), tiny_vit(attn_backend="sdpa").eval()
    sdpa.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), sdpa(x))  # on CPU "auto" always runs SDPA


def test_list_forward_equals_per_crop_forward():
    torch.manual_seed(4)
    model = tiny_vit(num_register_tokens=1).eval()
    globals_, locals_ = torch.randn(2, 3, 28, 28), torch.randn(3, 3, 14, 21)
    masks = torch.rand(2, 16) < 0.4
    with torch.no_grad():
        listed = model.forward_features([globals_, locals_], [masks, None])
        single = [model.forward_features(globals_, masks), model.forward_features(locals_)]
    assert len(listed) == 2
    for got, expected in zip(listed, single):
        assert got["masks"] is expected["masks"]
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-6)
    assert listed[1]["x_norm_patchtokens"].shape == (3, 6, 32)


# ---------------------------------------------------------------------------------------------- intermediate layers
def test_get_intermediate_layers_matches_manual_block_loop():
    torch.manual_seed(6)
    model = tiny_vit(depth=3, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 35, 21)  # 5 x 3 patch grid
    with torch.no_grad():
        tokens = model.prepare_tokens_with_masks(x)
        per_block = []
        for block in model.blocks:
            tokens = block(tokens)
            per_block.append(tokens)
        last_two = model.get_intermediate_layers(x, n=2)
        chosen = model.get_intermediate_layers(x, n=[0, 2], norm=False)
        reshaped = model.get_intermediate_layers(x, n=[1], reshape=True, return_class_token=True)
    assert isinstance(last_two, tuple) and len(last_two) == 2
    torch.testing.assert_close(last_two[0], model.norm(per_block[1])[:, 3:])
    torch.testing.assert_close(last_two[1], model.norm(per_block[2])[:, 3:])
    torch.testing.assert_close(chosen[0], per_block[0][:, 3:])
    torch.testing.assert_close(chosen[1], per_block[2][:, 3:])
    (patch_map, cls), = reshaped
    assert patch_map.shape == (2, 32, 5, 3) and cls.shape == (2, 32)
    normed = model.norm(per_block[1])
    torch.testing.assert_close(cls, normed[:, 0])
    for i in range(5):
        for j in range(3):
            torch.testing.assert_close(patch_map[:, :, i, j], normed[:, 3 + i * 3 + j])
    # the last block's normed tokens are what forward_features reports
    torch.testing.assert_close(last_two[1], model.forward_features(x)["x_norm_patchtokens"])
    with pytest.raises(ValueError, match=r"\[3\]"):
        model.get_intermediate_layers(x, n=[0, 3])


# ---------------------------------------------------------------------------------------------- init
def test_init_weights_follows_the_reference():
    torch.manual_seed(7)
    model = vit_small(patch_size=14, img_size=224, depth=2, init_values=1e-5, num_register_tokens=4)
    assert torch.all(model.mask_token == 0)
    assert model.cls_token.abs().max() < 1e-4 and model.cls_token.abs().max() > 0
    assert model.register_tokens.abs().max() < 1e-4 and model.register_tokens.std() > 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.001
    assert torch.all(qkv.bias == 0) and torch.all(model.blocks[1].mlp.fc2.bias == 0)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    torch.testing.assert_close(model.norm.weight, torch.ones(384))


def test_meta_device_build_then_init_weights_initialises_everything():
    with torch.device("meta"):
        model = tiny_vit(init_values=1e-5, num_register_tokens=2, drop_path_rate=0.2)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # whatever to_empty left behind must be overwritten
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.all(model.blocks[1].ls2.gamma == 1e-5) and torch.all(model.norm.weight == 1)
    assert torch.all(model.blocks[0].norm1.bias == 0) and torch.all(model.mask_token == 0)
    assert model.patch_embed.proj.weight.std() > 0


@pytest.mark.gpu
def test_cuda_forward_matches_cpu():
    torch.manual_seed(8)
    cpu_model = tiny_vit(num_register_tokens=1).eval()
    gpu_model = tiny_vit(num_register_tokens=1, attn_backend="auto").eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    x = torch.randn(2, 3, 35, 21)
    masks = torch.rand(2, 15) < 0.3
    with torch.no_grad():
        expected = cpu_model.forward_features(x, masks)["x_prenorm"]
        got = gpu_model.forward_features(x.cuda(), masks.cuda())["x_prenorm"].cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
