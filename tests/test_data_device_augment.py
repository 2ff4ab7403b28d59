"""`data.augmentation_device=cuda`: the batched augmentation reached from the config, on CPU tensors here.

The loader path must give the CPU pipeline's iBOT masks and (the same random numbers drawn per sample) crops close
to its crops; `train` must run with it; bad values are one config error."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine_common import real_data, synthetic_mri, tiny_cfg  # noqa: E402,F401 (fixture)

from dinov2_repro.config import ConfigError  # noqa: E402
from dinov2_repro.data.batched_augment import DeviceAugmentDraws  # noqa: E402
from dinov2_repro.data.loaders import build_ssl_data_loader  # noqa: E402
from dinov2_repro.train.engine import train  # noqa: E402


def colour_folder(root: Path, n: int = 6) -> Path:
    """Smooth colour images of a few sizes (bicubic resampling differs little on smooth content)."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((40 + 4 * i, 36), Image.BICUBIC).save(root / f"{i}.png")
    return root


def test_the_cuda_option_gives_the_cpu_loaders_masks_and_close_crops(tmp_path):
    folder = colour_folder(tmp_path / "colour")
    base = [f"data.path={folder}", "data.kind=folder", "data.augmentation=dinov2"]
    cpu_batch = next(iter(build_ssl_data_loader(tiny_cfg(*base))))
    with pytest.warns(UserWarning, match="CPU run"):
        loader = build_ssl_data_loader(tiny_cfg(*base, "data.augmentation_device=cuda"))
    dev_batch = next(iter(loader))
    for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(cpu_batch[key], dev_batch[key]), key
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for key in ("collated_global_crops", "collated_local_crops"):
        assert dev_batch[key].shape == cpu_batch[key].shape, key
        diff = ((dev_batch[key] - cpu_batch[key]) * std * 255).abs()  # in uint8 levels
        assert diff.mean() < 3.0, (key, float(diff.mean()))  # the same crops, jitter and blur per sample
    other = next(iter(build_ssl_data_loader(tiny_cfg(*base, "train.seed=1"))))  # what "close" is measured against
    assert ((other["collated_global_crops"] - cpu_batch["collated_global_crops"]) * std * 255).abs().mean() > 10


def test_train_runs_with_device_augmentation_and_bad_values_are_named(synthetic_mri, tmp_path):
    with pytest.warns(UserWarning, match="CPU run"):
        summary = train(tiny_cfg(*real_data(synthetic_mri), "data.augmentation_device=cuda",
                                 "train.max_iterations=2"), tmp_path / "run")
    assert summary["skipped_batches"] == 0
    assert all(np.isfinite(v) for v in summary["final_losses"].values())
    with pytest.raises(ConfigError, match="data.augmentation_device"):
        tiny_cfg("data.augmentation_device=gpu")
    with pytest.raises(ConfigError, match="data.augmentation_max_side"):
        tiny_cfg("data.augmentation_max_side=-1")


def test_workers_bound_the_image_size_keeping_the_aspect():
    image = torch.arange(100 * 50, dtype=torch.float32).reshape(1, 100, 50).div(20).to(torch.uint8)
    assert DeviceAugmentDraws.bound_size(image, 40).shape == (1, 40, 20)
    assert DeviceAugmentDraws.bound_size(image, 0) is image and DeviceAugmentDraws.bound_size(image, 100) is image
    flat = torch.full((3, 64, 64), 77, dtype=torch.uint8)
    assert torch.equal(DeviceAugmentDraws.bound_size(flat, 32), torch.full((3, 32, 32), 77, dtype=torch.uint8))
