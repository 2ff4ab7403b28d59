"""The ``histology`` augmentation preset: DINOv2's multi-crop recipe, plus H&E stain jitter per image and
right-angle turns and vertical flips per crop (slides have no up, no left and no canonical stain).

Stain jitter (Tellez et al. 2019, "Quantifying the effects of data augmentation and stain color normalization in
convolutional neural networks for computational pathology"): the image is split into haematoxylin, eosin and DAB
concentrations (scikit-image's ``rgb2hed``), each channel c becomes ``c * a + b`` with ``a`` ~ U[1 - scale,
1 + scale] and ``b`` ~ U[-shift, shift], and the result is recombined (``hed2rgb``). The defaults are their "HED
light" scale (0.05); the shift is in ``rgb2hed``'s units (optical density / ln 10^6, so 0.01 is an optical density
of about 0.14). Everything else (crops, horizontal flip, colour jitter, grayscale, blur, solarize) is the DINOv2
recipe of `MultiCropAugmentation`, unchanged. Every random number comes from the ``generator`` passed in.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import torch

HED_SCALE, HED_SHIFT = 0.05, 0.01
VFLIP_P = 0.5


def hed_jitter(image: torch.Tensor, generator: Optional[torch.Generator] = None, scale: float = HED_SCALE,
               shift: float = HED_SHIFT, record: Optional[dict] = None) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> uint8 (3, H, W) with its H, E and D stain concentrations scaled and shifted."""
    try:
        from skimage.color import hed2rgb, rgb2hed
    except ImportError as exc:
        raise ImportError(f"data.augmentation=histology needs scikit-image ({exc}): pip install dinov2_repro[wsi]"
                          ) from exc
    u = torch.rand(6, generator=generator, dtype=torch.float64).numpy()
    factors, offsets = 1.0 - scale + 2.0 * scale * u[:3], -shift + 2.0 * shift * u[3:]
    rgb = image.permute(1, 2, 0).numpy()
    hed = rgb2hed(rgb)
    # rgb2hed clips negative concentrations (colours outside the H/E/D gamut): add the change the jitter makes to
    # the reconstruction rather than the reconstruction itself, so that zero strength is the identity
    change = hed2rgb(hed * factors + offsets) - hed2rgb(hed)  # (H, W, 3) on the [0, 1] scale
    if record is not None:
        record.update(hed_factors=factors.tolist(), hed_offsets=offsets.tolist())
    out = np.clip(rgb + change * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def rgb_tensor(image) -> torch.Tensor:
    """uint8 (3, H, W) from a uint8 (1|3, H, W) tensor or a PIL image (this module does not import augmentations,
    which imports it)."""
    if not isinstance(image, torch.Tensor):
        from torchvision.transforms.v2.functional import pil_to_tensor

        image = pil_to_tensor(image.convert("RGB"))
    if image.ndim == 2:
        image = image[None]
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def turn_and_flip(crop: torch.Tensor, generator: Optional[torch.Generator], record: dict) -> torch.Tensor:
    """(C, S, S) -> (C, S, S): a random multiple of 90 degrees, then a vertical flip with p 0.5."""
    u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    record["rot90"], record["vflip"] = min(int(u[0] * 4), 3), u[1] < VFLIP_P
    crop = torch.rot90(crop, record["rot90"], dims=(-2, -1))
    return crop.flip(-2) if record["vflip"] else crop


class HistologyAugmentation:
    """``base`` (a DINOv2 `MultiCropAugmentation`) on a stain-jittered image, each crop turned and flipped.

    ``__call__(image, generator=None, trace=None) -> {"global_crops": [...], "local_crops": [...]}``; other
    attributes (crop sizes, scales, mean, std) are the base's."""

    preset = "histology"

    def __init__(self, base, hed_scale: float = HED_SCALE, hed_shift: float = HED_SHIFT):
        self.base, self.hed_scale, self.hed_shift = base, float(hed_scale), float(hed_shift)

    def __getattr__(self, name):  # only reached for names this class does not define
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"HistologyAugmentation(hed_scale={self.hed_scale}, hed_shift={self.hed_shift}, base={self.base!r})"

    def __call__(self, image, generator: Optional[torch.Generator] = None,
                 trace: Optional[List[dict]] = None) -> Dict[str, List[torch.Tensor]]:
        image = rgb_tensor(image)
        stain: dict = {"crop": "image"}
        image = hed_jitter(image.contiguous(), generator, self.hed_scale, self.hed_shift, stain)
        crops = self.base(image, generator=generator, trace=trace)
        turns = []
        for key in ("global_crops", "local_crops"):
            for i, crop in enumerate(crops[key]):
                turns.append({"crop": f"{key}_{i}"})
                crops[key][i] = turn_and_flip(crop, generator, turns[-1])
        if trace is not None:
            trace.append(stain)
            trace.extend(turns)
        return crops


def histology_augmentation(cfg, build: Callable) -> HistologyAugmentation:
    """The preset for a config: ``build`` (`build_multicrop_augmentation`) of the config with the DINOv2 recipe,
    wrapped."""
    from omegaconf import OmegaConf

    return HistologyAugmentation(build(OmegaConf.merge(cfg, {"data": {"augmentation": "dinov2"}})))
