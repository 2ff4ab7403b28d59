"""Multi-crop augmentation: shapes per patch size, blur schedules, solarize placement, normalisation, RNG."""

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.data.augmentations import (BLUR_PROBABILITIES, IMAGENET_MEAN, IMAGENET_STD,
                                             MultiCropAugmentation, sample_crop_box, source_limited_scale)


@pytest.fixture(autouse=True)
def _one_thread():
    # Per-image work runs single-threaded in loader workers; on a shared 2-core machine extra threads only thrash.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _image(h=80, w=96, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))


@pytest.mark.parametrize("patch, local", [(14, 98), (16, 96)])
def test_crop_shapes_and_counts(patch, local):
    aug = MultiCropAugmentation(local_crops_number=3, global_crops_size=224, local_crops_size=local, patch_size=patch)
    out = aug(_image(), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"global_crops", "local_crops"}
    assert [t.shape for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, local, local)] * 3
    assert all(t.dtype == torch.float32 for t in out["global_crops"] + out["local_crops"])


def test_crop_size_must_divide_by_patch_size():
    with pytest.raises(ValueError, match=r"local_crops_size=96.*patch_size=14"):
        MultiCropAugmentation(local_crops_size=96, patch_size=14)
    with pytest.raises(ValueError, match=r"global_crops_size=220.*patch_size=16"):
        MultiCropAugmentation(global_crops_size=220, patch_size=16)
    with pytest.raises(ValueError, match="blur_mode"):
        MultiCropAugmentation(blur_mode="sometimes")


def _decisions(aug, n_images, key, image=None):
    """Per crop kind (global_1, global_2, local): the fraction of crops whose trace says ``key``; and the total."""
    counts, totals = {}, {}
    image = _image(24, 24)[:1].expand(3, -1, -1) if image is None else image  # gray: the cheap path
    for seed in range(n_images):
        trace = []
        aug(image, generator=torch.Generator().manual_seed(seed), trace=trace)
        for record in trace:
            kind = record["crop"] if record["crop"].startswith("global") else "local"
            counts[kind] = counts.get(kind, 0) + int(record.get(key, False))
            totals[kind] = totals.get(kind, 0) + 1
    return {k: counts[k] / totals[k] for k in totals}, sum(counts.values())


@pytest.mark.parametrize("mode", ["paper", "as_released"])
def test_blur_probabilities_by_name(mode, monkeypatch):
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8, blur_mode=mode)
    calls = []
    original = aug._blur
    # (the local crops are blurred as one batch with a list of sigmas, one per blurred crop)
    monkeypatch.setattr(aug, "_blur", lambda crop, sigma: calls.extend(sigma if isinstance(sigma, list) else [sigma])
                        or original(crop, sigma))
    rates, n_blurred = _decisions(aug, 250, "blur")
    expected = dict(zip(("global_1", "global_2", "local"), BLUR_PROBABILITIES[mode]))
    for kind, p in expected.items():
        n = 250 * (2 if kind == "local" else 1)
        assert abs(rates[kind] - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (kind, rates[kind], p)
    assert len(calls) == n_blurred  # the blur op ran exactly when the decision says so
    assert all(0.1 <= s <= 2.0 for s in calls)
    assert MultiCropAugmentation().blur_mode == "paper"  # the documented default


def test_solarize_only_on_the_second_global_crop():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    rates, _ = _decisions(aug, 250, "solarize")
    assert rates["global_1"] == 0 and rates["local"] == 0
    assert abs(rates["global_2"] - 0.2) < 4 * (0.2 * 0.8 / 250) ** 0.5


def test_normalisation_by_hand_on_a_constant_image():
    # A constant image stays constant through crop, flip, blur and grayscale; without jitter or solarize the
    # output is exactly (v / 255 - mean) / std per channel.
    image = torch.full((3, 40, 40), 153, dtype=torch.uint8)
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8)
    expected = [(153 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    checked = 0
    for seed in range(20):
        trace = []
        out = aug(image, generator=torch.Generator().manual_seed(seed), trace=trace)
        for crop, record in zip(out["global_crops"] + out["local_crops"], trace):
            if not record["jitter"] and not record["solarize"]:
                for c in range(3):
                    assert torch.allclose(crop[c], torch.full_like(crop[c], expected[c]), atol=1e-5)
                checked += 1
    assert checked > 5


def test_same_generator_seed_same_crops_other_seed_differs():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    image = _image()
    a = aug(image, generator=torch.Generator().manual_seed(3))
    b = aug(image, generator=torch.Generator().manual_seed(3))
    c = aug(image, generator=torch.Generator().manual_seed(4))
    for x, y, z in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"],
                       c["global_crops"] + c["local_crops"]):
        assert torch.equal(x, y) and not torch.equal(x, z)


def test_mri_preset_gray_pipeline():
    aug = MultiCropAugmentation(local_crops_number=2, global_crops_size=16, local_crops_size=8, preset="mri",
                                mean=(0.2, 0.2, 0.2), std=(0.25, 0.25, 0.25))
    gray = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 30, 30), dtype=np.uint8))
    trace = []
    out = aug(gray.expand(3, -1, -1), generator=torch.Generator().manual_seed(0), trace=trace)
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.shape[0] == 3 and torch.equal(crop[0], crop[1]) and torch.equal(crop[1], crop[2])
    assert all("grayscale" not in r for r in trace)
    assert all(set(r.get("jitter_factors", {})) <= {"brightness", "contrast"} for r in trace)
    gammas, noise = [], []
    for seed in range(150):
        trace = []
        aug(gray, generator=torch.Generator().manual_seed(seed), trace=trace)
        gammas += [r.get("gamma") for r in trace]
        noise += [r["noise"] for r in trace]
    applied = [g for g in gammas if g is not None]
    assert abs(len(applied) / len(gammas) - 0.8) < 4 * (0.16 / len(gammas)) ** 0.5  # p = 0.8
    assert abs(np.mean(noise) - 0.5) < 4 * (0.25 / len(noise)) ** 0.5  # p = 0.5
    assert 0.7 <= min(applied) and max(applied) <= 1.5 and min(applied) < 0.8 and max(applied) > 1.3


def test_accepts_pil_and_numpy_inputs():
    aug = MultiCropAugmentation(local_crops_number=1, global_crops_size=16, local_crops_size=8)
    array = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
    from_pil = aug(Image.fromarray(array), generator=torch.Generator().manual_seed(0))
    from_numpy = aug(array, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_pil["global_crops"][0], from_numpy["global_crops"][0])


def test_crop_box_follows_scale_and_falls_back_to_centre():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(100, 120, (0.05, 0.32), rng.random(40).tolist())
        assert 0 <= top <= 100 - h and 0 <= left <= 120 - w
        assert 0.04 <= h * w / 12000 <= 0.34  # rounding of h, w moves the area a little
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # every try too large (scale 1, extreme aspect draws) on a very wide image: centred crop of ratio 4/3
    assert sample_crop_box(10, 100, (1.0, 1.0), [0.0, 1.0, 0.5, 0.5] * 10) == (0, 43, 10, 13)


def test_source_limited_scale_by_hand():
    # 8 x 8 scan, 64 px global view of 8 x 8 patches: only the whole image gives one source pixel per patch.
    assert source_limited_scale(8, 8, 64, (0.32, 1.0), 8, 1.0) == (1.0, 1.0)
    # 32 px local view, 4 x 4 patches: at least 4 x 4 = 16 of the 64 source pixels.
    assert source_limited_scale(8, 8, 32, (0.05, 0.32), 8, 1.0) == (0.25, 0.32)
    # the upper end follows the lower one when the bound passes it
    assert source_limited_scale(8, 8, 64, (0.05, 0.32), 8, 1.0) == (1.0, 1.0)
    # 2 pixels per patch on a 16 x 16 image: (2 x 4)^2 = 64 of 256
    assert source_limited_scale(16, 16, 32, (0.05, 0.32), 8, 2.0) == (0.25, 0.32)
    # the bound does not bind on larger images, and is off at 0 or without a patch size
    assert source_limited_scale(48, 48, 64, (0.32, 1.0), 8, 1.0) == (0.32, 1.0)
    assert source_limited_scale(48, 48, 32, (0.05, 0.32), 8, 1.0) == (0.05, 0.32)
    assert source_limited_scale(8, 8, 64, (0.32, 1.0), 8, 0.0) == (0.32, 1.0)
    assert source_limited_scale(8, 8, 64, (0.32, 1.0), None, 1.0) == (0.32, 1.0)


def test_tiny_images_keep_a_source_pixel_per_patch_larger_ones_are_untouched():
    def boxes(image, px, seed):
        aug = MultiCropAugmentation(global_crops_size=64, local_crops_size=32, local_crops_number=4, patch_size=8,
                                    min_source_px_per_patch=px)
        trace = []
        out = aug(image, generator=torch.Generator().manual_seed(seed), trace=trace)
        return [r["box"] for r in trace], out

    tiny = _image(8, 8)
    recipe_areas, limited_areas = [], []
    for seed in range(20):
        limited, _ = boxes(tiny, 1.0, seed)
        recipe, _ = boxes(tiny, 0.0, seed)
        assert limited[:2] == [(0, 0, 8, 8)] * 2  # global views: the whole scan
        limited_areas += [h * w for _, _, h, w in limited[2:]]
        recipe_areas += [h * w for _, _, h, w in recipe[2:]]
    # local views >= 16 source pixels up to the rounding of h and w; the recipe's go down to 3
    assert min(limited_areas) >= 14 and min(recipe_areas) <= 8
    # a 48 px patch: the bound does not bind, and every crop equals the recipe's, pixel for pixel
    image = _image(48, 48, seed=3)
    (b1, out1), (b0, out0) = boxes(image, 1.0, 7), boxes(image, 0.0, 7)
    assert b1 == b0
    for key in ("global_crops", "local_crops"):
        assert all(torch.equal(a, b) for a, b in zip(out1[key], out0[key]))
    # the log line's threshold: the 32 px local views (16 source pixels at least, scale from 0.05) bind below 320
    aug = MultiCropAugmentation(global_crops_size=64, local_crops_size=32, local_crops_number=4, patch_size=8,
                                min_source_px_per_patch=1.0)
    assert aug.enlarged_below() == pytest.approx(16 / 0.05)
    assert source_limited_scale(17, 18, 32, (0.05, 0.32), 8, 1.0)[0] > 0.05  # 306 px
    assert source_limited_scale(16, 20, 32, (0.05, 0.32), 8, 1.0)[0] == 0.05  # 320 px
    with pytest.raises(ValueError, match="min_source_px_per_patch"):
        MultiCropAugmentation(patch_size=14, global_crops_size=224, local_crops_size=98,
                              min_source_px_per_patch=-1)


def test_grayscale_rounds_like_pil():
    from dinov2_repro.data.augmentations import to_grayscale

    pixels = np.array([[[153, 153, 153], [255, 0, 0], [0, 255, 0], [10, 200, 30]]], dtype=np.uint8)  # (1, 4, 3)
    ours = to_grayscale(torch.from_numpy(pixels).permute(2, 0, 1))[0, 0].tolist()
    assert ours == [153, 76, 150, 124]  # 0.299 R + 0.587 G + 0.114 B, rounded (123.81 -> 124)
    assert ours == list(np.asarray(Image.fromarray(pixels).convert("L"))[0])


def test_separable_blur_matches_torchvision():
    from torchvision.transforms.v2 import functional as F

    from dinov2_repro.data.augmentations import gaussian_blur_separable

    image = _image(30, 26)
    for sigma in (0.1, 0.7, 2.0):
        ours = gaussian_blur_separable(image, sigma)
        assert (ours.int() - F.gaussian_blur(image, [9, 9], [sigma, sigma]).int()).abs().max() <= 1


def test_gray_fast_path_equals_three_channel_computation():
    gray = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 40, 36), dtype=np.uint8)).expand(3, -1, -1)
    fast = MultiCropAugmentation(local_crops_number=2, global_crops_size=24, local_crops_size=12)
    slow = MultiCropAugmentation(local_crops_number=2, global_crops_size=24, local_crops_size=12)
    slow.gray_fast_path = False
    level = 1.0 / 255 / min(IMAGENET_STD)
    exact = 0
    for seed in range(8):
        trace = []
        a = fast(gray, generator=torch.Generator().manual_seed(seed), trace=trace)
        b = slow(gray, generator=torch.Generator().manual_seed(seed))
        for x, y, record in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], trace):
            if record["jitter"]:
                # saturation/hue are exact identities on gray; torchvision's 3-channel contrast takes the mean of
                # a luma with weights summing to 0.9999, which moves some pixels by a level
                assert (x - y).abs().max() <= 2 * level + 1e-6
            else:
                assert torch.equal(x, y)
                exact += 1
    assert exact >= 3


@pytest.mark.parametrize("preset", ["dinov2", "mri"])
def test_without_intensity_jitter_same_geometry_no_intensity_ops(preset):
    from dinov2_repro.data.batched_augment import recipe_from_augmentation

    kwargs = dict(local_crops_number=3, global_crops_size=16, local_crops_size=8, preset=preset)
    full, light = MultiCropAugmentation(**kwargs), MultiCropAugmentation(**kwargs, intensity_jitter=False)
    image = _image(40, 40)
    n_intensity = 0
    for seed in range(40):
        trace_full, trace_light = [], []
        full(image, generator=torch.Generator().manual_seed(seed), trace=trace_full)
        light(image, generator=torch.Generator().manual_seed(seed), trace=trace_light)
        same_draws = True  # until MRI noise consumes extra random numbers in the full pipeline
        for a, b in zip(trace_full, trace_light):
            if same_draws:  # same RNG draws: identical boxes, flips, blur and solarize decisions...
                assert all(a[key] == b[key] for key in ("box", "flip", "blur", "solarize"))
                n_intensity += a["jitter"]
            # ...but never an intensity op, which the full pipeline does apply.
            assert not b["jitter"] and not b.get("grayscale") and not b.get("gamma_applied") and not b.get("noise")
            same_draws = same_draws and not a.get("noise")
    assert n_intensity > 0
    recipe = recipe_from_augmentation(light)  # the GPU path gets the same probabilities
    assert recipe.jitter_p == recipe.grayscale_p == recipe.gamma_p == recipe.noise_p == 0.0
    assert recipe_from_augmentation(full).jitter_p == 0.8


def _grouped_conv_blur(image, sigma, kernel_size=9):
    """The previous implementation: two 1-D convolutions with the channels as groups (float output)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels, pad = image.shape[0], kernel_size // 2
    out = torch.nn.functional.pad(image.to(torch.float32).unsqueeze(0), [pad] * 4, mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return out.squeeze(0)


def test_blur_as_shifted_sums_equals_the_grouped_convolution_and_batches():
    from dinov2_repro.data.augmentations import gaussian_blur_separable

    sigmas = (0.1, 0.55, 1.3, 2.0)
    images = [_image(37, 41, seed) for seed in range(len(sigmas))]
    for image, sigma in zip(images, sigmas):
        unit = image.to(torch.float32) / 255
        assert (gaussian_blur_separable(unit, sigma) - _grouped_conv_blur(unit, sigma)).abs().max() <= 1e-6
        reference = _grouped_conv_blur(image, sigma).round_().clamp_(0, 255).to(torch.uint8)
        assert torch.equal(gaussian_blur_separable(image, sigma), reference)
        assert torch.equal(gaussian_blur_separable(image[:1], sigma), reference[:1])  # one channel
    batch = gaussian_blur_separable(torch.stack(images), list(sigmas))  # one sigma per image
    for row, image, sigma in zip(batch, images, sigmas):
        assert torch.equal(row, gaussian_blur_separable(image, sigma))


def _photo(size=96):
    from skimage import data

    return torch.from_numpy(np.ascontiguousarray(data.astronaut()[100:100 + size, 180:180 + size])).permute(2, 0, 1)


def test_hue_rotation_matches_torchvision_within_one_level():
    from torchvision.transforms.v2 import functional as F

    from dinov2_repro.data.augmentations import adjust_hue

    images = [_image(64, 72, 3), _photo()]
    images.append(torch.tensor([[0, 0, 0], [255, 255, 255], [7, 7, 7], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                                [200, 10, 50], [30, 180, 20], [10, 20, 240], [255, 254, 0]],
                               dtype=torch.uint8).t().reshape(3, 1, -1))  # gray, primaries, sector edges
    differing = total = 0
    for image in images:
        for factor in (-0.5, -0.1, -0.037, 0.0, 0.021, 0.1, 0.5):
            diff = (adjust_hue(image, factor).int() - F.adjust_hue(image, factor).int()).abs()
            assert int(diff.max()) <= 1, factor
            differing += int((diff > 0).sum())
            total += diff.numel()
    assert differing / total < 1e-3  # float rounding on a level boundary only
    factors = [-0.1, 0.0, 0.07]
    batch = torch.stack([_image(30, 30, seed) for seed in range(3)])
    for row, image, factor in zip(adjust_hue(batch, factors), batch, factors):  # per-image factors
        assert torch.equal(row, adjust_hue(image, factor))
    gray = _image(10, 10)[:1]
    assert adjust_hue(gray, 0.1) is gray


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_jitter_ops_equal_torchvision_kernels(channels):
    from torchvision.transforms.v2 import functional as F

    from dinov2_repro.data.augmentations import batched_jitter_op

    batch = torch.stack([_image(33, 29, seed)[:channels] for seed in range(4)])
    factors = [0.6, 1.0, 1.13, 1.4]
    kernels = {"brightness": F.adjust_brightness_image, "contrast": F.adjust_contrast_image,
               "saturation": F.adjust_saturation_image}
    for name, kernel in kernels.items():
        out = batched_jitter_op(batch, name, factors)
        for row, image, factor in zip(out, batch, factors):
            assert torch.equal(row, kernel(image, factor)), name


@pytest.mark.parametrize("kind", ["colour", "gray"])
def test_local_crops_as_one_batch_equal_one_at_a_time(kind):
    image = _photo(120) if kind == "colour" else _image(90, 80, 5)[:1].expand(3, -1, -1)
    batched = MultiCropAugmentation(local_crops_number=6, global_crops_size=32, local_crops_size=16)
    single = MultiCropAugmentation(local_crops_number=6, global_crops_size=32, local_crops_size=16)
    single.batch_local_crops = False
    jittered = blurred = 0
    for seed in range(12):
        trace_b, trace_s = [], []
        a = batched(image, generator=torch.Generator().manual_seed(seed), trace=trace_b)
        b = single(image, generator=torch.Generator().manual_seed(seed), trace=trace_s)
        assert trace_b == trace_s  # same random numbers, decisions and factors
        for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
            assert x.shape == y.shape and torch.equal(x, y)
        jittered += sum(r["jitter"] for r in trace_b[2:])
        blurred += sum(r["blur"] for r in trace_b[2:])
    assert jittered > 20 and blurred > 10


def test_normalisation_is_one_multiply_add_within_rounding():
    aug = MultiCropAugmentation(local_crops_number=0, global_crops_size=16, local_crops_size=8)
    crop = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, -1, -1)
    fused = torch.addcmul(aug._shift, crop.to(torch.float32), aug._scale)
    plain = (crop.to(torch.float32) / 255 - aug.mean) / aug.std
    assert (fused - plain).abs().max() <= 1e-6


def test_resize_from_interleaved_pixels_equals_resize_from_planes():
    # The pipeline hands torch's uint8 antialiased resize an (H, W, 3)-interleaved image (its native layout).
    from torchvision.transforms.v2 import functional as F

    planar = _photo(120).contiguous()
    interleaved = planar.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(8, 121, 2))
        top, left = int(rng.integers(0, 121 - h)), int(rng.integers(0, 121 - w))
        for size in (98, 32, 224):
            args = (top, left, h, w, [size, size])
            kwargs = dict(interpolation=F.InterpolationMode.BICUBIC, antialias=True)
            assert torch.equal(F.resized_crop_image(interleaved, *args, **kwargs),
                               F.resized_crop_image(planar, *args, **kwargs))
