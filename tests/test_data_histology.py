"""The histology augmentation preset: HED stain jitter (shapes, dtypes, determinism, identity at zero strength)
and the DINOv2 multi-crop recipe with right-angle turns and vertical flips."""

import pytest
import torch

pytest.importorskip("skimage")

from test_engine_common import tiny_cfg  # noqa: E402

from dinov2_repro.config import ConfigError  # noqa: E402
from dinov2_repro.data.augmentations import build_multicrop_augmentation  # noqa: E402
from dinov2_repro.data.histology import HistologyAugmentation, hed_jitter  # noqa: E402


def he_like(seed=0, size=48):
    """uint8 (3, size, size): pink eosin with purple nuclei on a little white."""
    g = torch.Generator().manual_seed(seed)
    image = torch.tensor([225, 140, 185], dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()
    image += torch.randn(3, size, size, generator=g) * 10
    nuclei = torch.rand(size, size, generator=g) < 0.1
    image[:, nuclei] = torch.tensor([110.0, 60.0, 150.0]).view(3, 1)
    image[:, :4] = 245
    return image.clamp(0, 255).to(torch.uint8)


def test_hed_jitter_keeps_shape_and_dtype_and_is_deterministic_with_a_seeded_generator():
    image = he_like()
    a = hed_jitter(image, torch.Generator().manual_seed(3))
    b = hed_jitter(image, torch.Generator().manual_seed(3))
    c = hed_jitter(image, torch.Generator().manual_seed(4))
    assert a.shape == image.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    strong = hed_jitter(image, torch.Generator().manual_seed(4), scale=0.3, shift=0.03)
    assert (strong.float() - image.float()).abs().mean() > (c.float() - image.float()).abs().mean() > 0.1
    same = hed_jitter(image, torch.Generator().manual_seed(3), scale=0.0, shift=0.0)
    assert torch.equal(same, image)  # zero strength is the identity


def test_histology_preset_gives_dinov2_shaped_crops_turned_and_flipped_reproducibly():
    cfg = tiny_cfg("data.augmentation=histology")
    augmentation = build_multicrop_augmentation(cfg)
    assert isinstance(augmentation, HistologyAugmentation) and augmentation.base.preset == "dinov2"
    assert augmentation.global_crops_size == 32  # the base's attributes show through
    plain = build_multicrop_augmentation(tiny_cfg())(he_like(), generator=torch.Generator().manual_seed(0))
    trace, again = [], []
    crops = augmentation(he_like(), generator=torch.Generator().manual_seed(0), trace=trace)
    same = augmentation(he_like(), generator=torch.Generator().manual_seed(0), trace=again)
    for key in ("global_crops", "local_crops"):
        assert [c.shape for c in crops[key]] == [c.shape for c in plain[key]]
        assert all(c.dtype == torch.float32 for c in crops[key])
        assert all(torch.equal(x, y) for x, y in zip(crops[key], same[key]))
    turns = [r for r in trace if "rot90" in r]
    assert len(turns) == 2 + cfg.crops.local_crops_number and trace == again
    assert any("hed_factors" in r for r in trace)
    many = []
    for seed in range(20):
        augmentation(he_like(size=16), generator=torch.Generator().manual_seed(seed), trace=many)
    assert {r["rot90"] for r in many if "rot90" in r} == {0, 1, 2, 3}
    assert {r["vflip"] for r in many if "vflip" in r} == {True, False}


def test_histology_preset_is_cpu_only():
    with pytest.raises(ConfigError, match="histology runs on the CPU"):
        tiny_cfg("data.augmentation=histology", "data.augmentation_device=cuda")


def test_gray_and_pil_inputs_become_rgb():
    from PIL import Image

    augmentation = build_multicrop_augmentation(tiny_cfg("data.augmentation=histology"))
    gray = he_like()[:1]
    for image in (gray, Image.fromarray(he_like().permute(1, 2, 0).numpy())):
        crops = augmentation(image, generator=torch.Generator().manual_seed(0))
        assert crops["global_crops"][0].shape == (3, 32, 32)
