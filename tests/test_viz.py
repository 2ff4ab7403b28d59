"""`dinov2_repro.viz`: explicit attention against SDPA, masks, hand-set attention, PCA, the CLI and the report panel."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.models.vision_transformer import build_backbone
from dinov2_repro.models.weights import sidecar_description, write_export
from dinov2_repro.viz.attention import attention_weights, block_attention, cls_attention, mass_mask
from dinov2_repro.viz.cli import main
from dinov2_repro.viz.inputs import ViewTransform
from dinov2_repro.viz.panel import pick_panel_images
from dinov2_repro.viz.pca import patch_tokens, pca_rgb

TINY = "random:vit_small/8,embed_dim=32,depth=2,num_heads=2,img_size=32,init_values=1"


def tiny_model(**kwargs):
    options = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, img_size=32, init_values=1.0)
    return build_backbone("vit_small", **{**options, **kwargs}).eval()


@pytest.mark.parametrize("registers", [0, 3])
def test_explicit_attention_times_values_is_the_sdpa_output_and_rows_sum_to_one(registers):
    model = tiny_model(num_register_tokens=registers)
    attn = model.blocks[1].attn
    seen = {}
    attn.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0]))
    attn.proj.register_forward_pre_hook(lambda m, inputs: seen.setdefault("merged", inputs[0]))  # SDPA, pre-proj
    with torch.no_grad():
        model(torch.randn(2, 3, 40, 24))  # not the trained size: pos-embed interpolation
        weights, values = attention_weights(attn, seen["x"])
    batch, heads, n_tokens, _ = weights.shape
    assert (batch, heads, n_tokens) == (2, 4, 1 + registers + 5 * 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, heads, n_tokens))
    merged = (weights @ values).transpose(1, 2).reshape(batch, n_tokens, -1)
    torch.testing.assert_close(merged, seen["merged"], atol=1e-5, rtol=1e-4)


def test_block_attention_hooks_only_while_asked_and_checks_the_block():
    model = tiny_model()
    images = torch.randn(1, 3, 32, 32)
    weights = block_attention(model, images, block=0)
    assert weights.shape == (1, 4, 17, 17)
    cls_row = block_attention(model, images, block=0, queries=1)  # what the maps use: no N x N matrix
    assert cls_row.shape == (1, 4, 1, 17)
    torch.testing.assert_close(cls_row, weights[:, :, :1])
    assert not model.blocks[0].attn._forward_hooks  # the hook is gone afterwards
    with pytest.raises(ValueError, match="block 2 is out of range"):
        block_attention(model, torch.randn(1, 3, 32, 32), block=2)


def test_mass_mask_holds_the_mass_and_is_minimal():
    maps = torch.rand(3, 4, 5, 7) ** 3
    for mass in (0.1, 0.6, 0.9, 1.0):
        mask = mass_mask(maps, mass)
        assert mask.shape == maps.shape and mask.dtype == torch.bool
        share = (maps / maps.sum((-2, -1), keepdim=True)).flatten(-2)
        flat = mask.flatten(-2)
        kept = (share * flat).sum(-1)
        assert (kept >= mass - 1e-5).all()
        smallest_kept = torch.where(flat, share, torch.inf).min(-1).values
        assert (kept - smallest_kept < mass - 1e-6).all()  # dropping any kept patch falls short
        largest_left = torch.where(flat, -torch.inf, share).max(-1).values
        assert (largest_left <= smallest_kept).all()  # the kept patches are the largest ones
    with pytest.raises(ValueError):
        mass_mask(maps, 0.0)


def hand_set_model(num_register_tokens=0):
    """One block, one head, width 8: token dim 0 = a patch's mean intensity; CLS = e1; q = -40 x, k = x, so the
    CLS query meets only a bright patch (all-zero tokens are zero after LayerNorm)."""
    model = build_backbone("vit_small", patch_size=4, embed_dim=8, depth=1, num_heads=1, img_size=16,
                           num_register_tokens=num_register_tokens, init_values=1.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.blocks[0].norm1.weight.fill_(1.0)
        model.patch_embed.proj.weight[0].fill_(1.0 / 48)
        model.cls_token[0, 0, 1] = 1.0
        if num_register_tokens:
            model.register_tokens[0, :, 0] = 1.0  # registers look like the bright patch: they take attention too
        qkv = model.blocks[0].attn.qkv.weight  # (3 D, D): [q; k; v]
        qkv[:8] = -40 * torch.eye(8)
        qkv[8:16] = torch.eye(8)
        qkv[16:] = torch.eye(8)
    return model


@pytest.mark.parametrize("row,col", [(0, 0), (1, 2), (3, 3)])
def test_hand_set_backbone_peaks_at_the_bright_patch(row, col):
    image = torch.zeros(1, 3, 16, 16)
    image[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4] = 1.0
    att = cls_attention(hand_set_model(), image)
    assert att.patches.shape == (1, 1, 4, 4)
    assert divmod(int(att.mean[0].argmax()), 4) == (row, col)
    assert float(att.patches[0, 0, row, col]) > 0.99
    assert mass_mask(att.mean, 0.6)[0].sum() == 1


def test_registers_are_left_out_of_the_map_and_reported():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:12, 4:8] = 1.0
    att = cls_attention(hand_set_model(num_register_tokens=2), image)
    assert att.patches.shape == (1, 1, 4, 4) and att.registers.shape == (1, 1, 2)
    assert divmod(int(att.mean[0].argmax()), 4) == (2, 1)
    assert float(att.register_share()[0]) == pytest.approx(2 / 3, abs=0.01)  # two registers + one patch alike
    total = att.patches.sum() + att.registers.sum() + att.cls.sum()
    assert float(total) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("size", [(37, 61), (45, 29), (33, 33)])
def test_pca_is_deterministic_with_the_right_shapes_at_odd_and_non_square_sizes(size):
    model = tiny_model()
    transform = ViewTransform(27, 8, [0.5] * 3, [0.25] * 3)  # 27 -> 24: three patches on the shorter side
    pixels = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    shown, x = transform(pixels)
    assert shown.shape[1] % 8 == 0 and shown.shape[2] % 8 == 0 and min(shown.shape[1:]) == 24
    tokens = patch_tokens(model, x.unsqueeze(0))[0]
    grid = (shown.shape[1] // 8, shown.shape[2] // 8)
    assert tokens.shape == (*grid, 32)
    other = patch_tokens(model, torch.randn(1, 3, 40, 24))[0]  # a second, differently shaped image: joint PCA
    first, again = pca_rgb([tokens, other]), pca_rgb([tokens.clone(), other.clone()])
    assert [v.shape for v in first.rgb] == [(*grid, 3), (5, 3, 3)]
    assert [v.shape for v in first.foreground] == [grid, (5, 3)]
    for a, b in zip(first.rgb, again.rgb):
        assert torch.equal(a, b)
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in first.rgb)


def test_a_very_long_image_is_cropped_to_a_bounded_aspect_ratio():
    shown, x = ViewTransform(16, 8, [0.5] * 3, [0.25] * 3)(torch.zeros(3, 20, 400, dtype=torch.uint8))
    assert shown.shape == (3, 16, 64) and x.shape == (3, 16, 64)  # 16 x 320 -> 16 x (4 x 16)
    from dinov2_repro.eval.features import EvalTransform

    pixels = torch.randint(0, 256, (3, 30, 47), dtype=torch.uint8)
    square, x = ViewTransform(16, 8, [0.5] * 3, [0.25] * 3, square=True, resize=18)(pixels)
    assert square.shape == (3, 16, 16)
    torch.testing.assert_close(x, EvalTransform(18, 16, [0.5] * 3, [0.25] * 3)(pixels))  # what evaluation sees


def test_pca_puts_the_border_in_the_background_whatever_the_sign():
    torch.manual_seed(1)
    inside, outside = torch.randn(16), torch.randn(16)
    for sign in (1.0, -1.0):
        tokens = (sign * outside).repeat(5, 7, 1) + 0.01 * torch.randn(5, 7, 16)
        tokens[1:-1, 1:-1] = sign * inside + 0.01 * torch.randn(3, 5, 16)
        view = pca_rgb([tokens])
        expected = torch.zeros(5, 7, dtype=torch.bool)
        expected[1:-1, 1:-1] = True
        assert torch.equal(view.foreground[0], expected)
        assert float(view.rgb[0][~expected].abs().max()) == 0.0  # background black


def write_images(folder, sizes=((40, 56), (33, 47))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        pixels = (rng.random((h, w)) * 60).astype(np.uint8)
        pixels[h // 4:h // 2, w // 4:w // 2] = 220
        Image.fromarray(pixels, mode="L").save(folder / f"scan{i}.png")
    return folder


def run_dir_backbone(root):
    torch.manual_seed(5)  # not the random baseline's seed
    model = tiny_model(num_register_tokens=2)
    state = model.state_dict()
    write_export(root / "export", state, sidecar_description(model, state, arch="vit_small", ffn_layer="mlp",
                                                             layerscale=1.0))
    return root


def hub_file_backbone(path):
    model = build_backbone("vit_small", patch_size=14, depth=1, img_size=518, init_values=1.0)  # published layout
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("view", ["attention", "pca"])
def test_cli_writes_pngs_for_a_run_a_hub_file_and_random(view, tmp_path, capsys):
    images = write_images(tmp_path / "images")
    run = run_dir_backbone(tmp_path / "run")
    hub = hub_file_backbone(tmp_path / "dinov2_vits14_pretrain.pth")
    out = tmp_path / "out"
    rc = main([view, "--backbone", str(run), "--backbone", str(hub), "--backbone", TINY, "--compare", "random",
               "--images", str(images), "--out", str(out), "--size", "28"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / f"{view}.json").read_text())
    names = [b["name"] for b in summary["backbones"]]
    assert names == ["run", "random:run", "dinov2_vits14_pretrain.pth", "random:dinov2_vits14_pretrain.pth",
                     "random:vit_small/8"]
    for name in summary["files"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [im["name"] for im in summary["images"]] == ["scan0.png", "scan1.png"]
    if view == "attention":
        assert len(summary["files"]) == 1 + len(names)  # the grid and one per-head grid per backbone
        stats = summary["images"][1]["run"]
        assert stats["registers"] == 2 and 0 < stats["register_share"] < 1
        assert stats != summary["images"][1]["random:run"]  # the trained weights, not the baseline's
        assert stats["grid"] == [3, 4]  # 33 x 47 -> shorter side 24 (28 floored to the patch) -> 24 x 34 -> 24 x 32
        assert summary["images"][1]["dinov2_vits14_pretrain.pth"]["grid"] == [2, 2]  # 28 x 39 -> 28 x 28 at 14
        assert "registers take" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["pca", "--backbone", TINY, "--images", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.png" in err and len(err.splitlines()) == 1
    assert main(["attention", "--backbone", TINY, "--images", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(["attention", "--backbone", str(tmp_path / "nope.pth"), "--images",
                 str(write_images(tmp_path / "im"))]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_panel_picks_one_correct_and_one_wrong_image_per_class_by_path():
    predictions = dict(paths=["c.png", "a.png", "b.png", "d.png", "e.png"], labels=[0, 0, 0, 1, 1],
                       predicted=[0, 0, 1, 1, 1])
    assert pick_panel_images(predictions, 2) == [("a.png", 0, 0), ("b.png", 0, 1), ("d.png", 1, 1)]


def test_a_volume_contributes_a_few_evenly_spaced_kept_slices(tmp_path):
    import nibabel as nib

    from dinov2_repro.viz.inputs import collect_images, evenly_spaced

    volume = np.zeros((24, 20, 10), dtype=np.float32)
    volume[4:20, 4:16, 1:9] = np.random.default_rng(0).random((16, 12, 8)) + 1  # slices 1..8 hold foreground
    path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    images, skipped = collect_images([path, write_images(tmp_path / "im") / "scan0.png"], slices_per_volume=3)
    assert not skipped and [im.name for im in images][-1] == "scan0.png"
    slices = images[:-1]
    assert len(slices) == 3 and all(im.pixels.dtype == torch.uint8 and im.pixels.shape[0] == 3 for im in slices)
    assert [im.source for im in slices] == [im.source for im in collect_images([path], slices_per_volume=3)[0]]
    assert evenly_spaced(8, 3) == [2, 4, 6] and evenly_spaced(2, 3) == [0, 1]


def test_the_evaluation_report_embeds_the_attention_panel_and_survives_its_failure(tmp_path, monkeypatch):
    from dinov2_repro.eval.cli import main as eval_main

    data = tmp_path / "data"
    for split, n in (("Training", 6), ("Testing", 2)):
        for k, level in enumerate((40, 180)):
            write_images(data / split / f"class{k}", sizes=[(36, 36)] * n)
            for f in (data / split / f"class{k}").iterdir():
                Image.fromarray(np.full((36, 36), level + int(f.stem[-1]), np.uint8), mode="L").save(f)
    args = ["knn", "--backbone", TINY, "--data", str(data), "--no-progress", "data.num_workers=0"]
    assert eval_main([*args, "--output-dir", str(tmp_path / "ok")]) == 0
    report = (tmp_path / "ok" / "report.md").read_text()
    assert "![Attention on test images](attention_panel.png)" in report
    assert (tmp_path / "ok" / "attention_panel.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["figures"]["attention_panel"] == "attention_panel.png"

    def broken(*args, **kwargs):
        raise RuntimeError("no attention today")

    monkeypatch.setattr("dinov2_repro.viz.panel.attention_panel", broken)
    assert eval_main([*args, "--output-dir", str(tmp_path / "broken")]) == 0
    assert "attention_panel" not in (tmp_path / "broken" / "report.md").read_text()
    assert "WARNING: no attention panel (RuntimeError: no attention today)" in (
        tmp_path / "broken" / "eval.log").read_text()


def test_python_api_writes_the_same_view(tmp_path):
    import dinov2_repro

    image = write_images(tmp_path / "im") / "scan1.png"
    summary = dinov2_repro.visualize("pca", TINY, image, tmp_path / "out", joint=False, size=24)
    assert summary["files"] == {"pca": "pca.png"} and (tmp_path / "out" / "pca.png").is_file()
    assert summary["images"][0]["random:vit_small/8"]["grid"] == [3, 4]
    assert json.loads((tmp_path / "out" / "pca.json").read_text())["joint"] is False
    with pytest.raises(ValueError, match="view 'saliency'"):
        dinov2_repro.visualize("saliency", TINY, image, tmp_path / "out")


def test_dicom_series_and_files_give_slices_and_an_undecodable_image_is_named(tmp_path, capsys):
    from test_data_dicom import disc, write_slice

    from dinov2_repro.viz.inputs import collect_images

    series = tmp_path / "series"
    for k in range(5):
        write_slice(series / f"{k}.dcm", disc(100 + 10 * k), series="1.2.3", position=float(k), instance=k + 1)
    images, _ = collect_images([series], slices_per_volume=2)
    assert len(images) == 2 and all(im.pixels.shape[0] == 3 for im in images)
    assert len(collect_images([series / "3.dcm"])[0]) == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images, skipped = collect_images([broken, series / "0.dcm"])
    assert len(images) == 1 and len(skipped) == 1 and skipped[0].startswith(str(broken))
    assert main(["pca", "--backbone", TINY, "--images", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err and "no decodable image" in err


def test_the_top_level_command_routes_viz(capsys):
    from dinov2_repro.cli import main as top

    assert top(["--help"]) == 0 and "viz" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        top(["viz", "--help"])
    assert "--compare random" in capsys.readouterr().out
