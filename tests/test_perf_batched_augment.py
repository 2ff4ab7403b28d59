"""The device-side batched multi-crop (`dinov2_repro.data.batched_augment`) against the CPU pipeline.

- Same per-sample generator -> the very same random parameters as `MultiCropAugmentation` (from its trace).
- Same parameters -> pixels within the documented resize/rounding differences.
- Independent draws -> the same parameter distributions (KS tests and binomial rate checks).
- Pixel kernels == torchvision's float kernels; resize ~= torchvision's antialiased bicubic.
- Shapes, dtypes, ranges, determinism; the loader path gives the CPU loader's masks.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from dinov2_repro.data import batched_augment as BA
from dinov2_repro.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: on a shared 2-core machine, intra-op thread barriers cost 10-40 ms per op; one thread is
    # 20x faster here (and is what loader workers use anyway).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _smooth_image(height, width, seed=0, channels=3):
    """A smooth uint8 image (so that resize differences measure the filter, not aliasing)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    phase = torch.rand(3, generator=g) * 6
    planes = [0.5 + 0.4 * torch.sin(3 * xx + 2 * yy + phase[0]), 0.5 + 0.4 * torch.cos(4 * yy - xx + phase[1]),
              0.2 + 0.6 * xx * yy + 0.1 * torch.sin(phase[2])]
    image = (torch.stack(planes[:channels]).clamp(0, 1) * 255).round().to(torch.uint8)
    return image


def _augmentation(preset="dinov2", blur_mode="paper", n_local=3, g=28, l=14):
    return MultiCropAugmentation(global_crops_size=g, local_crops_size=l, local_crops_number=n_local, preset=preset,
                                 blur_mode=blur_mode)


def _kind_and_row(crop_index, image_index, batch):
    if crop_index < 2:
        return ("global_1", "global_2")[crop_index], image_index
    return "local", (crop_index - 2) * batch + image_index


def _images():
    # Different sizes (padding to one canvas), a portrait, and a 6x60 strip whose crops need the fallback box.
    return [_smooth_image(40, 40, 0), _smooth_image(52, 36, 1), _smooth_image(33, 47, 2), _smooth_image(6, 60, 3)]


@pytest.mark.parametrize("preset,blur_mode", [("dinov2", "paper"), ("dinov2", "as_released"), ("mri", "paper")])
def test_same_generator_gives_the_cpu_pipelines_parameters(preset, blur_mode):
    aug = _augmentation(preset, blur_mode)
    recipe = BA.recipe_from_augmentation(aug)
    images = _images()
    draws, traces = [], []
    for i, image in enumerate(images):
        trace = []
        aug(image, generator=torch.Generator().manual_seed(10 + i), trace=trace)
        traces.append(trace)
        draws.append(BA.DeviceAugmentDraws(recipe)(image, generator=torch.Generator().manual_seed(10 + i)))
    heights = torch.tensor([d["image"].shape[1] for d in draws])
    widths = torch.tensor([d["image"].shape[2] for d in draws])
    params = BA.BatchedMultiCrop(recipe, "cpu").sample_params(torch.stack([d["uniforms"] for d in draws]),
                                                             heights, widths)
    batch = len(images)
    fallback_seen = False
    for i, trace in enumerate(traces):
        assert len(trace) == recipe.crops_per_image
        for c, record in enumerate(trace):
            kind, row = _kind_and_row(c, i, batch)
            p = params[kind]
            box = tuple(p.boxes[row].tolist())
            assert box == tuple(record["box"]), (kind, i, c)
            fallback_seen |= i == 3 and box[2] == 6
            assert bool(p.flip[row]) == record["flip"]
            assert bool(p.jitter[row]) == record["jitter"]
            if record["jitter"]:
                for j, name in enumerate(BA.JITTER_OP_NAMES):
                    if name in record["jitter_factors"]:
                        assert float(p.jitter_factors[row, j]) == pytest.approx(record["jitter_factors"][name],
                                                                                abs=1e-6)
            assert bool(p.blur[row]) == record["blur"]
            if record["blur"]:
                assert float(p.blur_sigma[row]) == pytest.approx(record["sigma"], abs=1e-6)
            assert bool(p.solarize[row]) == record["solarize"]
            if preset == "dinov2":
                assert bool(p.grayscale[row]) == record["grayscale"]
            else:
                assert (float(p.gamma[row]) != 1.0) == record["gamma_applied"]
                if record["gamma_applied"]:
                    assert float(p.gamma[row]) == pytest.approx(record["gamma"], rel=1e-6)
                assert (float(p.noise_sigma[row]) > 0) == record["noise"]
                if record["noise"]:
                    assert float(p.noise_sigma[row]) == pytest.approx(record["noise_sigma"], rel=1e-6)
    assert fallback_seen, "the 6x60 strip should exercise torchvision's central-crop fallback"


def test_source_limited_scales_give_the_cpu_pipelines_boxes():
    # 4 and 2 patches per side; at 1.5 source pixels per patch the bound binds on the small images only
    aug = MultiCropAugmentation(global_crops_size=28, local_crops_size=14, local_crops_number=3, patch_size=7,
                                min_source_px_per_patch=1.5)
    recipe = BA.recipe_from_augmentation(aug)
    assert (recipe.patch_size, recipe.min_source_px_per_patch) == (7, 1.5)
    images = [_smooth_image(6, 6, 0), _smooth_image(9, 12, 1), _smooth_image(40, 40, 2), _smooth_image(6, 60, 3)]
    draws, traces = [], []
    for i, image in enumerate(images):
        traces.append([])
        aug(image, generator=torch.Generator().manual_seed(20 + i), trace=traces[-1])
        draws.append(BA.DeviceAugmentDraws(recipe)(image, generator=torch.Generator().manual_seed(20 + i)))
    heights = torch.tensor([d["image"].shape[1] for d in draws])
    widths = torch.tensor([d["image"].shape[2] for d in draws])
    uniforms = torch.stack([d["uniforms"] for d in draws])
    params = BA.BatchedMultiCrop(recipe, "cpu").sample_params(uniforms, heights, widths)
    unbound = BA.BatchedMultiCrop(dataclasses.replace(recipe, min_source_px_per_patch=0.0), "cpu")
    plain = unbound.sample_params(uniforms, heights, widths)
    for i, trace in enumerate(traces):
        for c, record in enumerate(trace):
            kind, row = _kind_and_row(c, i, len(images))
            assert tuple(params[kind].boxes[row].tolist()) == tuple(record["box"]), (kind, i, c)
    # the 6 x 6 image (36 px, bound (1.5 x 4)^2 = 36) is taken whole for its global views, its local views keep
    # >= 9 px (bound (1.5 x 2)^2, up to rounding) where the recipe's go lower; the 40 x 40 one is untouched
    assert params["global_1"].boxes[0].tolist() == params["global_2"].boxes[0].tolist() == [0, 0, 6, 6]
    local_rows = torch.arange(len(params["local"])) % len(images) == 0
    limited, recipe_boxes = params["local"].boxes[local_rows], plain["local"].boxes[local_rows]
    assert int((limited[:, 2] * limited[:, 3]).min()) >= 8 and int((recipe_boxes[:, 2] * recipe_boxes[:, 3]).min()) < 8
    for kind in ("global_1", "global_2", "local"):
        rows = torch.arange(len(params[kind])) % len(images) == 2
        assert torch.equal(params[kind].boxes[rows], plain[kind].boxes[rows])


@pytest.mark.parametrize("preset", ["dinov2", "mri"])
def test_same_parameters_give_the_cpu_pipelines_pixels(preset):
    aug = _augmentation(preset, n_local=2, g=42, l=28)
    recipe = BA.recipe_from_augmentation(aug)
    images = [_smooth_image(64, 64, 5), _smooth_image(56, 72, 6), _smooth_image(80, 60, 7)]
    if preset == "mri":
        images = [im[:1].expand(3, -1, -1).contiguous() for im in images]
    cpu, draws = [], []
    for i, image in enumerate(images):
        cpu.append(aug(image, generator=torch.Generator().manual_seed(i)))
        draws.append(BA.DeviceAugmentDraws(recipe)(image, generator=torch.Generator().manual_seed(i)))
    canvas, heights, widths = BA.images_to_canvas([d["image"] for d in draws], recipe.channels)
    out = BA.BatchedMultiCrop(recipe, "cpu").augment_canvas(canvas, heights, widths,
                                                            torch.stack([d["uniforms"] for d in draws]))
    batch = len(images)
    ours = {"global": out["collated_global_crops"], "local": out["collated_local_crops"]}
    theirs = {"global": torch.stack([c["global_crops"][j] for j in range(2) for c in cpu]),
              "local": torch.stack([c["local_crops"][j] for j in range(2) for c in cpu])}
    checked = 0
    for name in ("global", "local"):
        assert ours[name].shape == theirs[name].shape
        diff = ((ours[name] - theirs[name]) * STD * 255).abs()  # in 0..255 grey levels
        for row in range(diff.shape[0]):
            kind = ("global_1", "global_2")[row // batch] if name == "global" else "local"
            p = out["params"][kind]
            r = row % batch if name == "global" else row
            if float(p.noise_sigma[r]) > 0:  # noise pixels are drawn on the device: not comparable
                continue
            checked += 1
            # uint8 rounding after each CPU op and the resize filters differ by a few levels at most
            assert diff[row].mean() < 3.0, (name, row, float(diff[row].mean()))
            assert torch.quantile(diff[row].flatten(), 0.99) < 12.0, (name, row)
    assert checked >= 4


def test_parameter_distributions_match_cpu_pipeline():
    """Independent draws (batch generator) vs the CPU pipeline's traced draws: same distributions."""
    scipy_stats = pytest.importorskip("scipy.stats")
    aug = _augmentation("dinov2", "paper", n_local=2, g=14, l=14)
    recipe = BA.recipe_from_augmentation(aug)
    image = _smooth_image(24, 32, 0)
    n_cpu = 300  # the CPU pipeline runs its pixel ops too (tiny crops keep it fast)
    gen = torch.Generator().manual_seed(1)
    records = []
    for _ in range(n_cpu):
        trace = []
        aug(image, generator=gen, trace=trace)
        records += trace
    n_dev = 2000
    batched = BA.BatchedMultiCrop(recipe, "cpu")
    uniforms = batched.draw_uniforms(n_dev, torch.Generator().manual_seed(2))
    params = batched.sample_params(uniforms, torch.full((n_dev,), 24), torch.full((n_dev,), 32))

    def box_stats(boxes):
        boxes = np.asarray(boxes, dtype=float)
        return boxes[:, 2] * boxes[:, 3] / (24 * 32), np.log(boxes[:, 3] / boxes[:, 2]), boxes[:, 0], boxes[:, 1]

    for kinds, dev_kind in ((("global_1", "global_2"), ("global_1", "global_2")), (("local",), ("local",))):
        cpu_boxes = [r["box"] for r in records if r["crop"].startswith(kinds)]
        dev_boxes = torch.cat([params[k].boxes for k in dev_kind]).numpy()
        for cpu_stat, dev_stat, label in zip(box_stats(cpu_boxes), box_stats(dev_boxes),
                                             ("area", "log_aspect", "top", "left")):
            p_value = scipy_stats.ks_2samp(cpu_stat, dev_stat).pvalue
            assert p_value > 1e-3, (kinds, label, p_value)

    def check_rate(cpu_flags, dev_flags, label):
        n1, n2 = len(cpu_flags), len(dev_flags)
        p1, p2 = float(np.mean(cpu_flags)), float(np.mean(dev_flags))
        pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
        tolerance = 4.5 * math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n1 + 1 / n2)) + 1e-9
        assert abs(p1 - p2) <= tolerance, (label, p1, p2, tolerance)

    for kind, prefix in (("global_1", "global_1"), ("global_2", "global_2"), ("local", "local")):
        cpu_recs = [r for r in records if r["crop"].startswith(prefix)]
        p = params[kind]
        check_rate([r["flip"] for r in cpu_recs], p.flip.numpy(), f"{kind} flip")
        check_rate([r["jitter"] for r in cpu_recs], p.jitter.numpy(), f"{kind} jitter")
        check_rate([r["grayscale"] for r in cpu_recs], p.grayscale.numpy(), f"{kind} grayscale")
        check_rate([r["blur"] for r in cpu_recs], p.blur.numpy(), f"{kind} blur")
        check_rate([r["solarize"] for r in cpu_recs], p.solarize.numpy(), f"{kind} solarize")
    # The rates themselves are the recipe's (paper blur 1.0 / 0.1 / 0.5; solarize on global 2 only).
    assert params["global_1"].blur.all() and not params["global_1"].solarize.any()
    assert not params["local"].solarize.any()
    assert abs(params["global_2"].blur.float().mean() - 0.1) < 0.03
    assert abs(params["global_2"].solarize.float().mean() - 0.2) < 0.04
    sigmas = torch.cat([params[k].blur_sigma for k in params]).numpy()
    cpu_sigmas = np.array([r["sigma"] for r in records if r["blur"]])
    assert scipy_stats.ks_2samp(cpu_sigmas, sigmas).pvalue > 1e-3
    # Jitter op order: each op first equally often (a uniform random permutation).
    order = params["local"].jitter_order
    first = order[:, 0].bincount(minlength=4).float() / order.shape[0]
    assert torch.all((first - 0.25).abs() < 0.04), first


def test_shapes_dtypes_ranges_and_determinism():
    aug = _augmentation("dinov2", n_local=3, g=28, l=14)
    recipe = BA.recipe_from_augmentation(aug)
    images = [_smooth_image(40, 40, 0), _smooth_image(30, 50, 1)]
    batched = BA.BatchedMultiCrop(recipe, "cpu")
    out = batched(images, generator=torch.Generator().manual_seed(0))
    assert out["collated_global_crops"].shape == (4, 3, 28, 28)
    assert out["collated_local_crops"].shape == (6, 3, 14, 14)
    for key in ("collated_global_crops", "collated_local_crops"):
        crops = out[key]
        assert crops.dtype == torch.float32 and torch.isfinite(crops).all()
        pixels = crops * STD + MEAN  # back to [0, 1]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # grayscale crops have three equal channels
    for kind, crops in (("global_1", out["collated_global_crops"][:2]), ("local", out["collated_local_crops"])):
        pixels = crops * STD + MEAN
        for row in torch.nonzero(out["params"][kind].grayscale).flatten().tolist():
            assert torch.allclose(pixels[row, 0], pixels[row, 1], atol=1e-5)
    again = batched(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["collated_global_crops"], again["collated_global_crops"])
    assert torch.equal(out["collated_local_crops"], again["collated_local_crops"])
    other = batched(images, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out["collated_local_crops"], other["collated_local_crops"])
    # crop-major: global rows 0..B-1 are crop 1 of each image, rows B..2B-1 crop 2
    solo = batched(images[:1], generator=torch.Generator().manual_seed(0))
    assert solo["collated_global_crops"].shape[0] == 2 and solo["collated_local_crops"].shape[0] == 3


def test_mri_preset_is_gray_and_uses_no_hue_or_grayscale():
    aug = _augmentation("mri", n_local=2, g=28, l=14)
    recipe = BA.recipe_from_augmentation(aug)
    assert recipe.channels == 1 and "hue" not in recipe.jitter_ops and "saturation" not in recipe.jitter_ops
    image = _smooth_image(40, 40, 0, channels=1)
    out = BA.BatchedMultiCrop(recipe, "cpu")([image] * 3, generator=torch.Generator().manual_seed(0))
    pixels = out["collated_global_crops"] * STD + MEAN
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 1], pixels[:, 2],
                                                                                     atol=1e-5)
    assert not any(p.grayscale.any() for p in out["params"].values())


def test_pixel_kernels_match_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 12, 10, generator=g)
    factors = 0.5 + torch.rand(5, generator=g)
    shifts = torch.rand(5, generator=g) * 0.2 - 0.1
    sigmas = 0.1 + 1.9 * torch.rand(5, generator=g)
    for ours, theirs, values in ((BA.adjust_brightness, tvf.adjust_brightness, factors),
                                 (BA.adjust_contrast, tvf.adjust_contrast, factors),
                                 (BA.adjust_saturation, tvf.adjust_saturation, factors),
                                 (BA.adjust_hue, tvf.adjust_hue, shifts)):
        expected = torch.stack([theirs(x[i], float(values[i])) for i in range(5)])
        torch.testing.assert_close(ours(x.clone(), values), expected, atol=2e-6, rtol=0)
    expected = torch.stack([tvf.gaussian_blur(x[i], [9, 9], [float(sigmas[i])] * 2) for i in range(5)])
    torch.testing.assert_close(BA.gaussian_blur(x, sigmas, 9), expected, atol=2e-6, rtol=0)
    gray = BA.rgb_to_grayscale(x)
    torch.testing.assert_close(gray, tvf.rgb_to_grayscale(x), atol=2e-6, rtol=0)


@pytest.mark.parametrize("size", [16, 48])
def test_resize_close_to_torchvision_antialiased_bicubic(size):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    images = [_smooth_image(120, 96, 0), _smooth_image(100, 80, 1)]
    canvas, heights, widths = BA.images_to_canvas(images)
    # crop-major, 2 per image: rows 0, 2 from image 0 and rows 1, 3 from image 1
    boxes = torch.tensor([[0, 0, 120, 96], [10, 5, 90, 70], [3, 7, 20, 17], [60, 40, 40, 40]])
    out = BA.resized_crops(canvas, boxes, 2, size)
    for row, (top, left, h, w) in enumerate(boxes.tolist()):
        image = images[row % 2]
        expected = tvf.resized_crop(image.float() / 255, top, left, h, w, [size, size],
                                    interpolation=tvf.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        assert (out[row] - expected).abs().max() < 2.5 / 255, row


def test_loader_path_matches_cpu_loader(tmp_path):
    """Through MultiCropDataset + collate: same masks as SSLCollate, crops close to the CPU pipeline's."""
    from PIL import Image

    from dinov2_repro.data.collate import SSLCollate
    from dinov2_repro.data.datasets import UnlabeledFolderDataset
    from dinov2_repro.data.loaders import MultiCropDataset
    from dinov2_repro.data.masking import MaskingGenerator

    for i in range(3):
        Image.fromarray(_smooth_image(48 + 4 * i, 44, i)[0].numpy(), mode="L").save(tmp_path / f"{i}.png")
    images = UnlabeledFolderDataset(tmp_path)
    aug = _augmentation("mri", n_local=2, g=28, l=14)
    recipe = BA.recipe_from_augmentation(aug)
    mask_generator = MaskingGenerator((2, 2), max_num_patches=2, min_num_patches=1)
    keys = [(0, 7), (2, 8), (1, 9)]  # (index, stream position)
    cpu_batch = SSLCollate(mask_generator, seed=3)([MultiCropDataset(images, aug, seed=5)[k] for k in keys])
    dev_samples = [MultiCropDataset(images, BA.DeviceAugmentDraws(recipe), seed=5)[k] for k in keys]
    dev_batch = BA.augment_batch(BA.BatchedMultiCrop(recipe, "cpu"),
                                 BA.DeviceAugmentCollate(recipe, mask_generator, seed=3)(dev_samples))
    for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(cpu_batch[key], dev_batch[key]), key
    assert dev_batch["n_skipped"] == cpu_batch["n_skipped"] == 0
    for key in ("collated_global_crops", "collated_local_crops"):
        assert dev_batch[key].shape == cpu_batch[key].shape
    # Compare the crops without device noise: rebuild the device batch with noise switched off on both sides
    # is not possible for the CPU pipeline, so compare only rows that drew no noise.
    params = BA.BatchedMultiCrop(recipe, "cpu").sample_params(
        torch.stack([s["crops"]["uniforms"] for s in dev_samples]),
        torch.tensor([s["crops"]["image"].shape[1] for s in dev_samples]),
        torch.tensor([s["crops"]["image"].shape[2] for s in dev_samples]))
    quiet = [r for r in range(3) if float(params["global_1"].noise_sigma[r]) == 0]
    for r in quiet:
        diff = ((dev_batch["collated_global_crops"][r] - cpu_batch["collated_global_crops"][r]) * STD[0] * 255).abs()
        assert diff.mean() < 3.0


def test_bad_images_are_named():
    with pytest.raises(ValueError, match="image 1"):
        BA.images_to_canvas([torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4)])
    recipe = BA.recipe_from_augmentation(_augmentation())
    with pytest.raises(ValueError, match="uniforms"):
        BA.split_uniforms(torch.rand(2, 3, BA.DRAWS_PER_CROP), recipe)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["dinov2", "mri"])
def test_cuda_matches_cpu(preset):
    aug = _augmentation(preset, n_local=4, g=56, l=28)
    recipe = BA.recipe_from_augmentation(aug)
    images = [_smooth_image(96, 80, i) for i in range(4)]
    if preset == "mri":
        images = [im[:1].contiguous() for im in images]
    uniforms = BA.BatchedMultiCrop(recipe, "cpu").draw_uniforms(4, torch.Generator().manual_seed(0))
    prepared = [BA.DeviceAugmentDraws.prepare_image(im, recipe) for im in images]
    canvas, heights, widths = BA.images_to_canvas(prepared, recipe.channels)
    cpu = BA.BatchedMultiCrop(recipe, "cpu").augment_canvas(canvas, heights, widths, uniforms)
    gpu = BA.BatchedMultiCrop(recipe, "cuda").augment_canvas(canvas, heights, widths, uniforms)
    noisy = {"collated_global_crops": torch.cat([cpu["params"]["global_1"].noise_sigma,
                                                 cpu["params"]["global_2"].noise_sigma]) > 0,
             "collated_local_crops": cpu["params"]["local"].noise_sigma > 0}
    for key in ("collated_global_crops", "collated_local_crops"):
        quiet = ~noisy[key]  # noise pixels come from the device's own generator: compare noise-free crops
        assert quiet.any()
        diff = (gpu[key].cpu()[quiet] - cpu[key][quiet]).abs()
        assert diff.max() < 1e-3, key
