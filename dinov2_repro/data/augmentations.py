"""DINOv2 multi-crop augmentation on tensors (torchvision.transforms.v2.functional), with explicit RNG.

Per crop (Oquab et al. 2023, sec. 2 of the recipe page): bicubic RandomResizedCrop -> horizontal flip (p 0.5)
-> colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; random order; p 0.8) -> grayscale
(p 0.2) -> Gaussian blur (kernel 9, sigma U[0.1, 2]) -> solarize (threshold 128, p 0.2, second global crop only)
-> normalise. Two global crops (scale 0.32-1) and N local crops (scale 0.05-0.32).

Blur probabilities (global 1, global 2, local) are chosen by name:
- ``"paper"`` (default): 1.0 / 0.1 / 0.5, what the DINO/DINOv2 papers describe;
- ``"as_released"``: 0.0 / 0.9 / 0.5, what the released DINOv2/DINOv3 code does (its two global probabilities
  are swapped by accident) and what the published checkpoints were trained with.

The ``"mri"`` preset is for single-channel scans: no hue/saturation jitter and no grayscale op; brightness and
contrast jitter (random order) with p 0.8, random gamma (log-uniform in [0.7, 1.5]) with p 0.8, the same blur and
solarize schedule, and additive Gaussian noise (sigma U[0.005, 0.03] on the 0..1 scale) with p 0.5. Gray inputs
are processed as one channel (3x less work) and repeated to 3 channels by the normalisation, whose mean/std should
come from the dataset (`dinov2-repro data stats`).

Randomness: every random number comes from the ``generator`` passed to `__call__` (a seeded ``torch.Generator``,
e.g. one per sample from `MultiCropDataset`), or torch's global RNG when it is None. Pass ``trace=[]`` to get one
record per crop of every random decision (crop box, flip, jitter, blur, solarize, ...), which tests count.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_PROBABILITIES = {"paper": (1.0, 0.1, 0.5), "as_released": (0.0, 0.9, 0.5)}
PRESETS = ("dinov2", "mri")

JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P, GRAYSCALE_P, SOLARIZE_P, SOLARIZE_THRESHOLD = 0.8, 0.2, 0.2, 128
BLUR_KERNEL, BLUR_SIGMA = 9, (0.1, 2.0)
MRI_GAMMA, MRI_GAMMA_P = (0.7, 1.5), 0.8
MRI_NOISE_SIGMA, MRI_NOISE_P = (0.005, 0.03), 0.5
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
DRAWS_PER_CROP = 4 * CROP_ATTEMPTS + 24


def check_crop_sizes(global_crops_size: int, local_crops_size: int, patch_size: Optional[int]) -> None:
    """Raise ValueError, naming the values, when a crop size is not a positive multiple of the patch size."""
    if patch_size is None:
        return
    for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
        if size < patch_size or size % patch_size:
            nearest = max(1, round(size / patch_size)) * patch_size
            raise ValueError(f"{name}={size} must be a positive multiple of patch_size={patch_size} "
                             f"(e.g. {nearest}; 98 for patch 14 and 96 for patch 16 are the local sizes)")


def sample_crop_box(height: int, width: int, scale: Sequence[float], uniforms: Sequence[float],
                    ratio: Sequence[float] = CROP_RATIO) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w) from 40 uniforms in [0, 1): torchvision's algorithm (10 tries of
    area ~ U(scale) and log-uniform aspect ratio, then a centred fallback) with the randomness passed in."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = uniforms[4 * attempt: 4 * attempt + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def to_uint8_chw(image) -> torch.Tensor:
    """PIL image, numpy array (H, W[, C]) or tensor (C, H, W) -> uint8 tensor (C, H, W) with C in {1, 3}."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        if hasattr(image, "mode"):  # PIL
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB")
            image = np.asarray(image)
        array = np.asarray(image)
        image = torch.from_numpy(array.copy())
        image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.dtype != torch.uint8:
        if image.is_floating_point():  # float images are taken to be on the 0..1 scale
            image = (image.clamp(0, 1) * 255.0).round()
        image = image.to(torch.uint8)
    if image.shape[0] == 2 or image.shape[0] == 4:  # drop alpha
        image = image[: image.shape[0] - 1]
    return image


def to_grayscale(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> (1, H, W) luma 0.299 R + 0.587 G + 0.114 B, *rounded* like PIL's ``convert("L")``.

    (torchvision's tensor version truncates, which darkens gray images by one level: 153 -> 152.)
    """
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
    luma = (image.to(torch.float32) * weights).sum(0, keepdim=True)
    return luma.round_().clamp_(0, 255).to(torch.uint8)


def single_channel(image: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) -> (1, H, W): as is when gray already (one channel, or three equal ones), else its luma."""
    if image.shape[0] == 1:
        return image
    if torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]):
        return image[:1]
    return to_grayscale(image)


def gaussian_kernel1d(sigma: float, kernel_size: int = BLUR_KERNEL) -> List[float]:
    """torchvision's 1-D Gaussian kernel (``gaussian_blur``'s) as Python floats, summing to 1."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).tolist()


def gaussian_blur_separable(image: torch.Tensor, sigma: float, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """Gaussian blur of a (C, H, W) uint8/float tensor as two 1-D passes (2k instead of k^2 multiply-adds), with
    reflect padding; the same kernel as torchvision's ``gaussian_blur`` (results agree to one grey level).

    Each pass is k fused multiply-adds of shifted views of the padded image, over all channels at once: the same
    sums in the same order as a per-channel 1 x k convolution (equal to it in tests), 2-3x faster on one CPU
    thread than ``conv2d`` with ``groups=C``, which allocates and faults pages for every call.
    """
    weights = gaussian_kernel1d(sigma, kernel_size)
    height, width = image.shape[-2:]
    pad = kernel_size // 2
    padded = torch.nn.functional.pad(image.to(torch.float32).unsqueeze(0), [pad, pad, pad, pad], mode="reflect")[0]
    rows = padded[..., 0:width] * weights[0]
    for i in range(1, kernel_size):
        rows.add_(padded[..., i:i + width], alpha=weights[i])
    out = rows[..., 0:height, :] * weights[0]
    for i in range(1, kernel_size):
        out.add_(rows[..., i:i + height, :], alpha=weights[i])
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


_HUE_OFFSETS = torch.tensor([0.0, 2.0, 4.0]).view(3, 1, 1)
_TO_UINT8 = 255.999 / 255.0  # torchvision's float -> uint8 conversion (x * 255.999, truncated) on the 0..255 scale


def adjust_hue(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (an HSV hue rotation) on a uint8 (..., 3, H, W) image, in about half the time.

    A hue rotation keeps each pixel's max and min channel (V and S); only the middle channel moves. So instead of
    RGB -> HSV -> RGB with a gather over six sectors, each output channel is ``min + chroma * w_c(h')`` with
    ``w_c = clamp(|((h' - 2c) mod 6) - 3| - 1, 0, 1)`` the hue triangle of channel c (h' in sextants): the HSV->RGB
    table written arithmetically. Same hue formula and the same conversion back to uint8 as torchvision (x * 255.999
    on the 0..1 scale, truncated); results agree with ``adjust_hue`` to one level (on about 1 pixel in 10,000,
    where float rounding sits on a level boundary). One-channel images are returned as they are.
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if image.shape[-3] == 1 or image.numel() == 0:
        return image
    if image.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as F

        return F.adjust_hue(image, hue_factor)
    x = image.to(torch.float32)
    r, g, b = x.unbind(-3)
    maxc, minc = torch.aminmax(x, dim=-3)
    chroma = maxc - minc
    divisor = torch.where(chroma == 0, 1.0, chroma)
    hue = torch.where(maxc == r, (g - b) / divisor,
                      torch.where(maxc == g, (b - r) / divisor + 2.0, (r - g) / divisor + 4.0))
    hue = hue.add_(6.0 * hue_factor).unsqueeze_(-3)
    # clamp(|y - 3|, 1, 2) - 1 = w; the "- 1" goes into the offset: out = (min - chroma) + chroma * clamp(...)
    weight = (hue - _HUE_OFFSETS).remainder_(6.0).sub_(3.0).abs_().clamp_(1.0, 2.0)
    chroma = chroma.mul_(_TO_UINT8).unsqueeze_(-3)
    return torch.addcmul(minc.mul_(_TO_UINT8).unsqueeze_(-3).sub_(chroma), weight, chroma).to(torch.uint8)


class MultiCropAugmentation:
    """Two global crops and ``local_crops_number`` local crops of one image, as float tensors.

    ``__call__(image, generator=None, trace=None) -> {"global_crops": [2 x (3,G,G)], "local_crops": [N x (3,L,L)]}``
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.32, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.32), local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96, patch_size: Optional[int] = None,
                 preset: str = "dinov2", blur_mode: str = "paper", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, intensity_jitter: bool = True):
        if preset not in PRESETS:
            raise ValueError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
        if blur_mode not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_mode must be one of {sorted(BLUR_PROBABILITIES)}, got {blur_mode!r}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={list(mean)} std={list(std)}")
        check_crop_sizes(global_crops_size, local_crops_size, patch_size)
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.preset = preset
        self.blur_mode = blur_mode
        self.blur_probabilities = BLUR_PROBABILITIES[blur_mode]
        # intensity_jitter=False keeps the geometry, blur and solarize but drops the intensity ops (colour jitter,
        # grayscale; MRI gamma and noise): on homogeneous data they can make two views of one image differ more
        # than two images do, and DINO then collapses (docs/evaluation.md, the demo).
        self.intensity_jitter = bool(intensity_jitter)
        self.jitter_p = JITTER_P if intensity_jitter else 0.0
        self.grayscale_p = GRAYSCALE_P if intensity_jitter else 0.0
        self.gamma_p = MRI_GAMMA_P if intensity_jitter else 0.0
        self.noise_p = MRI_NOISE_P if intensity_jitter else 0.0
        self.gray_fast_path = True  # tests switch it off to compare with the 3-channel computation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std

    def __repr__(self) -> str:
        return (f"MultiCropAugmentation(preset={self.preset!r}, blur_mode={self.blur_mode!r}, "
                f"global=2x{self.global_crops_size} scale {self.global_crops_scale}, "
                f"local={self.local_crops_number}x{self.local_crops_size} scale {self.local_crops_scale})")

    def __call__(self, image, generator: Optional[torch.Generator] = None,
                 trace: Optional[List[dict]] = None) -> Dict[str, List[torch.Tensor]]:
        image = to_uint8_chw(image)
        if self.preset == "mri":
            image = single_channel(image)
        elif self.gray_fast_path and image.shape[0] == 3 and torch.equal(image[0], image[1]) \
                and torch.equal(image[1], image[2]):
            # Gray stored as RGB (most scans): saturation, hue and grayscale are identities on gray pixels, so
            # one channel gives the same crops at a third (or less: hue is the costliest op) of the work.
            image = image[:1]
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        g, l = self.global_crops_size, self.local_crops_size
        global_crops = [
            self._view(image, g, self.global_crops_scale, blur_g1, 0.0, generator, trace, "global_1"),
            self._view(image, g, self.global_crops_scale, blur_g2, SOLARIZE_P, generator, trace, "global_2"),
        ]
        local_crops = [self._view(image, l, self.local_crops_scale, blur_local, 0.0, generator, trace, f"local_{i + 1}")
                       for i in range(self.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _blur(self, crop: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_blur_separable(crop, sigma, BLUR_KERNEL)

    def _view(self, image: torch.Tensor, size: int, scale, blur_p: float, solarize_p: float,
              generator: Optional[torch.Generator], trace: Optional[List[dict]], name: str) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        # One RNG call per crop; consumed in a fixed order so a crop's draws never depend on earlier outcomes.
        u = torch.rand(DRAWS_PER_CROP, generator=generator, dtype=torch.float64).tolist()
        k = 4 * CROP_ATTEMPTS
        record: dict = {"crop": name}
        top, left, h, w = sample_crop_box(image.shape[-2], image.shape[-1], scale, u[:k])
        # (torchvision's image kernels are called directly: the v2 dispatchers cost ~10 us a call, ~40 calls here)
        crop = F.resized_crop_image(image, top, left, h, w, [size, size],
                                    interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        record["box"] = (top, left, h, w)
        record["flip"] = u[k] < 0.5
        if record["flip"]:
            crop = F.horizontal_flip_image(crop)
        order = sorted(range(4), key=lambda i: u[k + 3 + i])  # a random permutation of the jitter ops
        if self.preset == "dinov2":
            record["jitter"] = u[k + 1] < self.jitter_p
            if record["jitter"]:
                factors = self._jitter_factors(u[k + 7: k + 11])
                record["jitter_factors"] = factors
                crop = self._jitter(crop, factors, order)
            record["grayscale"] = u[k + 2] < self.grayscale_p
            if record["grayscale"] and crop.shape[0] == 3:
                crop = to_grayscale(crop).expand(3, -1, -1)
        else:
            record["jitter"] = u[k + 1] < self.jitter_p
            if record["jitter"]:
                factors = self._jitter_factors(u[k + 7: k + 11])
                factors = {"brightness": factors["brightness"], "contrast": factors["contrast"]}
                record["jitter_factors"] = factors
                crop = self._jitter(crop, factors, order)
            record["gamma_applied"] = u[k + 2] < self.gamma_p
            if record["gamma_applied"]:
                lo, hi = math.log(MRI_GAMMA[0]), math.log(MRI_GAMMA[1])
                record["gamma"] = math.exp(lo + (hi - lo) * u[k + 11])
                crop = F.adjust_gamma_image(crop, record["gamma"])
        record["blur"] = u[k + 12] < blur_p
        if record["blur"]:
            record["sigma"] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[k + 13]
            crop = self._blur(crop, record["sigma"])
        record["solarize"] = u[k + 14] < solarize_p
        if record["solarize"]:
            crop = F.solarize_image(crop, threshold=SOLARIZE_THRESHOLD)
        if self.preset == "mri":
            out = crop.to(torch.float32).mul_(1.0 / 255.0)
            record["noise"] = u[k + 15] < self.noise_p
            if record["noise"]:
                sigma = MRI_NOISE_SIGMA[0] + (MRI_NOISE_SIGMA[1] - MRI_NOISE_SIGMA[0]) * u[k + 16]
                record["noise_sigma"] = sigma
                noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)
                out = out.add_(noise.mul_(sigma)).clamp_(0.0, 1.0)
            if trace is not None:
                trace.append(record)
            return (out - self.mean) / self.std  # (C, H, W) with C = 1 broadcasts to 3 channels here
        if trace is not None:
            trace.append(record)
        # (x / 255 - mean) / std as one multiply-add (equal to within float rounding, ~1e-7); C = 1 broadcasts to 3
        return torch.addcmul(self._shift, crop.to(torch.float32), self._scale)

    @staticmethod
    def _jitter_factors(u: Sequence[float]) -> dict:
        b, c, s, h = (JITTER[name] for name in ("brightness", "contrast", "saturation", "hue"))
        return {"brightness": 1 - b + 2 * b * u[0], "contrast": 1 - c + 2 * c * u[1],
                "saturation": 1 - s + 2 * s * u[2], "hue": -h + 2 * h * u[3]}

    @staticmethod
    def _jitter(crop: torch.Tensor, factors: dict, order: Sequence[int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        ops = (("brightness", F.adjust_brightness_image), ("contrast", F.adjust_contrast_image),
               ("saturation", F.adjust_saturation_image), ("hue", adjust_hue))
        for i in order:
            name, op = ops[i]
            if name in factors and (crop.shape[0] == 3 or name in ("brightness", "contrast")):
                crop = op(crop, factors[name])  # (saturation and hue leave a gray crop unchanged)
        return crop


# The name used by the reference implementation, for readers coming from it.
DataAugmentationDINO = MultiCropAugmentation


def build_multicrop_augmentation(cfg) -> MultiCropAugmentation:
    """The augmentation described by a config (``crops.*``, ``data.augmentation/blur_mode/mean/std``,
    ``student.patch_size``)."""
    return MultiCropAugmentation(
        global_crops_scale=tuple(cfg.crops.global_crops_scale),
        local_crops_scale=tuple(cfg.crops.local_crops_scale),
        local_crops_number=int(cfg.crops.local_crops_number),
        global_crops_size=int(cfg.crops.global_crops_size),
        local_crops_size=int(cfg.crops.local_crops_size),
        patch_size=int(cfg.student.patch_size),
        preset=str(cfg.data.augmentation),
        blur_mode=str(cfg.data.blur_mode),
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        intensity_jitter=bool(cfg.data.intensity_jitter),
    )
