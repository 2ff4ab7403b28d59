"""Decoding of every storage format to uint8 (3, H, W), including 16-bit rescaling (hand-checked values)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.decode import (ImageDecodeError, decode_image_file, decode_with_pil, is_image_file,
                                      rescale_to_uint8)


def _expect_gray(t, values):
    assert t.dtype == torch.uint8 and t.shape == (3, *values.shape)
    for c in range(3):
        assert np.array_equal(t[c].numpy(), values)


def test_grayscale_png_and_bmp_repeat_to_three_channels(tmp_path):
    values = np.array([[0, 17, 255], [128, 64, 3]], dtype=np.uint8)
    for name in ("g.png", "g.bmp"):
        Image.fromarray(values, mode="L").save(tmp_path / name)
        _expect_gray(decode_image_file(tmp_path / name), values)


def test_sixteen_bit_png_and_tiff_minmax_rescale_by_hand(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    # 255 * x / 4000 rounded half up: 0, 63.75 -> 64, 127.5 -> 128, 255
    expected = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "a.png")
    Image.fromarray(raw).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    _expect_gray(decode_image_file(tmp_path / "a.png"), expected)  # torchvision fast path
    _expect_gray(decode_with_pil(tmp_path / "a.png"), expected)  # PIL reference path
    _expect_gray(decode_image_file(tmp_path / "a.tif"), expected)  # PIL only


def test_sixteen_bit_offset_range_uses_min_not_zero(tmp_path):
    raw = np.array([[1000, 1510, 3550]], dtype=np.uint16)  # (x - 1000) * 255 / 2550: 0, 51, 255
    Image.fromarray(raw).save(tmp_path / "b.png")
    _expect_gray(decode_image_file(tmp_path / "b.png"), np.array([[0, 51, 255]], dtype=np.uint8))


def test_percentile_rescale_ignores_a_hot_pixel():
    ramp = np.arange(1000, dtype=np.float64).reshape(10, 100)
    ramp[-1, -1] = 65535  # one hot pixel
    minmax = rescale_to_uint8(ramp, "minmax")
    robust = rescale_to_uint8(ramp, "percentile")
    assert minmax[5, 0] <= 2  # the hot pixel squeezes the ramp into the bottom levels
    assert abs(int(robust[5, 0]) - 128) <= 2  # value 500 sits mid-range once the 0.5/99.5 % tails are clipped
    assert robust[-1, -1] == 255 and robust[0, 0] == 0
    assert rescale_to_uint8(np.full((3, 3), 7.0)).max() == 0  # constant image -> zeros, no division by zero
    with pytest.raises(ValueError, match="rescale mode"):
        rescale_to_uint8(ramp, "gamma")


def test_fast_path_matches_pil_for_rgb_palette_alpha(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8).save(tmp_path / "pal.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    for name in ("rgb.png", "pal.png", "rgba.png", "la.png"):
        fast, ref = decode_image_file(tmp_path / name), decode_with_pil(tmp_path / name)
        reference = np.asarray(Image.open(tmp_path / name).convert("RGB")).transpose(2, 0, 1)
        assert fast.shape == (3, 12, 9) and fast.dtype == torch.uint8, name
        assert torch.equal(fast, ref), name
        assert np.array_equal(fast.numpy(), reference), name
    assert np.array_equal(decode_image_file(tmp_path / "rgb.png").numpy(), rgb.transpose(2, 0, 1))


def test_gray_jpeg_has_three_equal_channels(tmp_path):
    values = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    Image.fromarray(values).save(tmp_path / "g.jpg", quality=95)
    t = decode_image_file(tmp_path / "g.jpg")
    assert t.shape == (3, 16, 32)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert (t[0].int() - torch.from_numpy(values).int()).abs().max() <= 6  # lossy, but close


def test_corrupt_and_missing_files_raise_naming_the_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError, match="broken.png"):
        decode_image_file(bad)
    with pytest.raises(ImageDecodeError, match="nothere.jpg"):
        decode_image_file(tmp_path / "nothere.jpg")


def test_extensions_are_case_insensitive():
    assert all(is_image_file(n) for n in ("a.JPG", "b.Jpeg", "c.PNG", "d.tif", "e.TIFF", "f.bmp"))
    assert not any(is_image_file(n) for n in ("a.txt", "b.png.bak", "c.gif"))
