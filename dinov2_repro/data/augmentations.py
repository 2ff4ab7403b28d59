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

Speed (CPU, one thread per loader worker; ``benchmarks/augmentation.py``, docs/benchmarks.md): the hue rotation
is computed without the RGB->HSV->RGB round trip (`adjust_hue`, within one level of torchvision's), the image is
resized from interleaved (H, W, 3) pixels (the uint8 resize kernel's own layout, converted once), the blur as
shifted multiply-adds (equal to the grouped convolution), the local crops are jittered, blurred and normalised as
one batch with per-crop parameters (equal to one at a time), torchvision's image kernels are called without the v2
dispatchers, and crops stay uint8 until one multiply-add normalises them.

Randomness: every random number comes from the ``generator`` passed to `__call__` (a seeded ``torch.Generator``,
e.g. one per sample from `MultiCropDataset`), or torch's global RNG when it is None. Pass ``trace=[]`` to get one
record per crop of every random decision (crop box, flip, jitter, blur, solarize, ...), which tests count.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

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


def min_crop_area(size: int, patch_size: Optional[int], px_per_patch: float) -> float:
    """Fewest source pixels a crop resized to ``size`` may cover: ``px_per_patch`` source pixels across each of
    its ``size / patch_size`` patches per side, squared. 0 when off (no patch size, or ``px_per_patch`` 0)."""
    if not patch_size or px_per_patch <= 0:
        return 0.0
    return (px_per_patch * size / patch_size) ** 2


def source_limited_scale(height: int, width: int, size: int, scale: Sequence[float], patch_size: Optional[int],
                         px_per_patch: float) -> Tuple[float, float]:
    """The crop-scale range for one ``height x width`` image, its lower end raised to `min_crop_area` (at most the
    whole image) and the upper end to no less than the lower.

    Below that area a patch of the view is interpolated from less than ``px_per_patch`` source pixels: on 8 x 8
    scans the recipe's crops cut the digit by whole source pixels and the DINO teacher stayed uniform
    (docs/small_scale.md). The recipe's own views (224 px crops of ImageNet-size images) never reach the bound.
    """
    floor = min_crop_area(size, patch_size, px_per_patch) / float(height * width)
    low = min(1.0, max(float(scale[0]), floor))
    return low, max(float(scale[1]), low)


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
    luma = (image.to(torch.float32) * weights).sum(-3, keepdim=True)  # (also a batch (N, 3, H, W) -> (N, 1, H, W))
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


def gaussian_blur_separable(image: torch.Tensor, sigma, kernel_size: int = BLUR_KERNEL) -> torch.Tensor:
    """Gaussian blur of a (C, H, W) uint8/float tensor as two 1-D passes (2k instead of k^2 multiply-adds), with
    reflect padding; the same kernel as torchvision's ``gaussian_blur`` (results agree to one grey level). A batch
    (N, C, H, W) takes one sigma per image (a sequence); each image's result equals its blur alone.

    Each pass is k fused multiply-adds of shifted views of the padded image, over all channels at once: the same
    sums in the same order as a per-channel 1 x k convolution (equal to it in tests), 2-3x faster on one CPU
    thread than ``conv2d`` with ``groups=C``, which allocates and faults pages for every call.
    """
    height, width = image.shape[-2:]
    pad = kernel_size // 2
    if isinstance(sigma, (int, float)):
        weights = gaussian_kernel1d(sigma, kernel_size)
        padded = torch.nn.functional.pad(image.to(torch.float32).unsqueeze(0), [pad] * 4, mode="reflect")[0]
        def add(out, x, weight):
            return out.add_(x, alpha=weight)
    else:  # per image: (k, N, 1, 1, 1); addcmul_(x, w) == add_(x, alpha=w) bit for bit
        weights = torch.tensor([gaussian_kernel1d(s, kernel_size) for s in sigma]).t().reshape(kernel_size, -1, 1, 1, 1)
        padded = torch.nn.functional.pad(image.to(torch.float32), [pad] * 4, mode="reflect")
        add = torch.Tensor.addcmul_
    rows = padded[..., 0:width] * weights[0]
    for i in range(1, kernel_size):
        add(rows, padded[..., i:i + width], weights[i])
    out = rows[..., 0:height, :] * weights[0]
    for i in range(1, kernel_size):
        add(out, rows[..., i:i + height, :], weights[i])
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


# Hue triangle of each output channel on h in sextants [0, 6): w_c = clamp(a_c * |h - o_c| + b_c, 0, 1), which is
# HSV->RGB's six-sector table (R: |h - 3| - 1; G: 2 - |h - 2|; B: 2 - |h - 4|).
_HUE_CENTRES = torch.tensor([3.0, 2.0, 4.0]).view(3, 1, 1)
_HUE_SLOPES = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
_HUE_BIASES = torch.tensor([-1.0, 2.0, 2.0]).view(3, 1, 1)
_TO_UINT8 = 255.999 / 255.0  # torchvision's float -> uint8 conversion (x * 255.999, truncated) on the 0..255 scale


def adjust_hue(image: torch.Tensor, hue_factor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (an HSV hue rotation) on uint8 (..., 3, H, W), in about a quarter of the time.

    A hue rotation keeps each pixel's max and min channel (V and S); only the middle channel moves. So instead of
    RGB -> HSV -> RGB with a gather over six sectors, each output channel is ``min + chroma * w_c(h')`` with ``w_c``
    the hue triangle of channel c (h' the rotated hue in sextants, [0, 6)): the HSV->RGB table written
    arithmetically. Same hue formula and the same conversion back to uint8 as torchvision (x * 255.999
    on the 0..1 scale, truncated); results agree with ``adjust_hue`` to one level (on 1 to 3 pixels in 10,000,
    where float rounding sits on a level boundary). One-channel images are returned as they are. A batch
    (N, 3, H, W) may take one factor per image (a sequence); each image's result equals its rotation alone.
    """
    per_image = not isinstance(hue_factor, (int, float))
    if not all(-0.5 <= f <= 0.5 for f in (hue_factor if per_image else [hue_factor])):
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if image.shape[-3] == 1 or image.numel() == 0:
        return image
    if image.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as F

        if per_image:
            return torch.stack([F.adjust_hue(x, float(f)) for x, f in zip(image, hue_factor)])
        return F.adjust_hue(image, hue_factor)
    # the rotation in sextants; per image: 6 * factor in double, then float32, the value a Python scalar would give
    shift = torch.tensor([6.0 * f for f in hue_factor]).view(-1, 1, 1) if per_image else 6.0 * hue_factor
    x = image.to(torch.float32)  # on the 0..255 scale: the hue is a ratio; the scale goes into the last step
    r, g, b = x.unbind(-3)
    # (elementwise max/min of the planes: ~10x faster than aminmax over the channel dimension on one thread)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    max_r, max_g = maxc == r, maxc == g
    # torchvision's hue in sextants: (g - b) / C where max is r, 2 + (b - r) / C where g, 4 + (r - g) / C where b
    # (C = 1 where the pixel is gray: integer values, so clamp_min(1) is torchvision's where(C == 0, 1, C))
    numerator = torch.where(max_r, g - b, torch.where(max_g, b - r, r - g))
    offset = torch.where(max_r, shift, torch.where(max_g, shift + 2.0, shift + 4.0))  # (+ the rotation)
    hue = numerator.div_(chroma.clamp_min(1.0)).add_(offset)
    hue = hue.sub_(torch.floor(hue * (1.0 / 6.0)).mul_(6.0)).unsqueeze_(-3)  # mod 6 (3x faster than remainder_)
    weight = torch.addcmul(_HUE_BIASES, (hue - _HUE_CENTRES).abs_(), _HUE_SLOPES).clamp_(0.0, 1.0)
    return torch.addcmul(minc.mul_(_TO_UINT8).unsqueeze_(-3), weight,
                         chroma.mul_(_TO_UINT8).unsqueeze_(-3)).to(torch.uint8)


def _luma(image: torch.Tensor) -> torch.Tensor:
    # torchvision's float luma (``_rgb_to_grayscale_image``, preserve_dtype=False), (..., 3, H, W) -> (..., 1, H, W)
    r, g, b = image.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def batched_jitter_op(images: torch.Tensor, name: str, factors: Sequence[float]) -> torch.Tensor:
    """One colour-jitter op ("brightness", "contrast", "saturation" or "hue") on a uint8 batch (N, C, H, W) with
    one factor per image: each image's result equals torchvision's uint8 kernel (``adjust_brightness_image`` ...)
    on it alone, bit for bit (``adjust_hue`` here for hue). Saturation and hue leave one-channel images as they are.
    """
    if name == "hue":
        return adjust_hue(images, factors)
    channels = images.shape[-3]
    if name == "saturation" and channels == 1:
        return images
    ratio = torch.tensor(factors, dtype=torch.float32).view(-1, 1, 1, 1)
    if name == "brightness":
        return images.mul(ratio).clamp_(0, 255).to(torch.uint8)
    if name == "contrast":
        gray = _luma(images).floor_() if channels == 3 else images.to(torch.float32)
        other = torch.mean(gray, dim=(-3, -2, -1), keepdim=True)
    elif name == "saturation":
        other = _luma(images).floor_()
    else:
        raise ValueError(f"unknown jitter op {name!r}")
    # torchvision's _blend: x * r + (1 - r) * other, with 1 - r taken in double like its Python float
    keep = torch.tensor([1.0 - float(f) for f in factors], dtype=torch.float32).view(-1, 1, 1, 1)
    return images.mul(ratio).addcmul_(other, keep).clamp_(0, 255).to(torch.uint8)


class MultiCropAugmentation:
    """Two global crops and ``local_crops_number`` local crops of one image, as float tensors.

    ``__call__(image, generator=None, trace=None) -> {"global_crops": [2 x (3,G,G)], "local_crops": [N x (3,L,L)]}``
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.32, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.32), local_crops_number: int = 8,
                 global_crops_size: int = 224, local_crops_size: int = 96, patch_size: Optional[int] = None,
                 preset: str = "dinov2", blur_mode: str = "paper", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, intensity_jitter: bool = True,
                 min_source_px_per_patch: float = 0.0):
        if preset not in PRESETS:
            raise ValueError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
        if blur_mode not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_mode must be one of {sorted(BLUR_PROBABILITIES)}, got {blur_mode!r}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values with std > 0, got mean={list(mean)} std={list(std)}")
        check_crop_sizes(global_crops_size, local_crops_size, patch_size)
        if min_source_px_per_patch < 0:
            raise ValueError(f"min_source_px_per_patch must be >= 0, got {min_source_px_per_patch}")
        # 0 (the class default) is the published pipeline; configs default to 1 (`source_limited_scale`).
        self.patch_size = patch_size
        self.min_source_px_per_patch = float(min_source_px_per_patch)
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
        # The local crops (one size) go through colour jitter, grayscale, blur and normalisation as one batch with
        # per-crop parameters: same random numbers, same ops in each crop's order, equal pixels (tested against
        # the one-crop-at-a-time path, which tests get by switching this off). "dinov2" preset only: the "mri"
        # preset's noise draws sit between the crops' draws in the RNG stream.
        self.batch_local_crops = True
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std

    def __repr__(self) -> str:
        return (f"MultiCropAugmentation(preset={self.preset!r}, blur_mode={self.blur_mode!r}, "
                f"global=2x{self.global_crops_size} scale {self.global_crops_scale}, "
                f"local={self.local_crops_number}x{self.local_crops_size} scale {self.local_crops_scale}, "
                f"min_source_px_per_patch={self.min_source_px_per_patch:g})")

    def enlarged_below(self) -> float:
        """The image area (pixels) below which `source_limited_scale` enlarges some crops (0: never)."""
        kinds = [(self.global_crops_size, self.global_crops_scale)]
        if self.local_crops_number:
            kinds.append((self.local_crops_size, self.local_crops_scale))
        return max(min_crop_area(size, self.patch_size, self.min_source_px_per_patch) / max(scale[0], 1e-12)
                   for size, scale in kinds)

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
        if image.shape[0] == 3:
            # torch's uint8 antialiased resize works on interleaved (H, W, 3) pixels: given planes it converts the
            # crop there and back on every call. One conversion per image instead (a no-op for PIL/numpy inputs,
            # already interleaved) makes the ten resizes ~2x faster; same output, bit for bit.
            image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        else:
            image = image.contiguous()
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        g, l = self.global_crops_size, self.local_crops_size
        g_scale, l_scale = (source_limited_scale(image.shape[-2], image.shape[-1], size, scale, self.patch_size,
                                                 self.min_source_px_per_patch)
                            for size, scale in ((g, self.global_crops_scale), (l, self.local_crops_scale)))
        global_crops = [
            self._view(image, g, g_scale, blur_g1, 0.0, generator, trace, "global_1"),
            self._view(image, g, g_scale, blur_g2, SOLARIZE_P, generator, trace, "global_2"),
        ]
        names = [f"local_{i + 1}" for i in range(self.local_crops_number)]
        if self.batch_local_crops and self.preset == "dinov2" and len(names) > 1:
            local_crops = self._views_batched(image, l, l_scale, blur_local, generator, trace, names)
        else:
            local_crops = [self._view(image, l, l_scale, blur_local, 0.0, generator, trace, name) for name in names]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _blur(self, crop: torch.Tensor, sigma: float) -> torch.Tensor:
        return gaussian_blur_separable(crop, sigma, BLUR_KERNEL)

    def _views_batched(self, image: torch.Tensor, size: int, scale, blur_p: float,
                       generator: Optional[torch.Generator], trace: Optional[List[dict]],
                       names: Sequence[str]) -> List[torch.Tensor]:
        """`_view` for several crops of one size at once (no solarize: local crops), with the same random numbers
        drawn in the same order, and the same per-crop decisions and trace records."""
        k = 4 * CROP_ATTEMPTS
        crops, records, orders = [], [], []
        for name in names:  # per crop: draws, box, resize, flip (the boxes differ)
            u, record, crop, order = self._draw_and_crop(image, size, scale, generator, name)
            orders.append(order)
            record["jitter"] = u[k + 1] < self.jitter_p
            if record["jitter"]:
                record["jitter_factors"] = self._jitter_factors(u[k + 7: k + 11])
            record["grayscale"] = u[k + 2] < self.grayscale_p
            record["blur"] = u[k + 12] < blur_p
            if record["blur"]:
                record["sigma"] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[k + 13]
            record["solarize"] = False
            crops.append(crop)
            records.append(record)
        channels = crops[0].shape[0]
        ops = ("brightness", "contrast", "saturation", "hue")
        for position in range(4):  # the jitter ops in each crop's own random order
            for op, name in enumerate(ops):
                rows = [i for i, r in enumerate(records) if r["jitter"] and orders[i][position] == op]
                if rows and (channels == 3 or name in ("brightness", "contrast")):
                    factors = [records[i]["jitter_factors"][name] for i in rows]
                    self._update_rows(crops, rows, lambda sub: batched_jitter_op(sub, name, factors))
        rows = [i for i, r in enumerate(records) if r["grayscale"]]
        if rows and channels == 3:
            self._update_rows(crops, rows, lambda sub: to_grayscale(sub).expand(-1, 3, -1, -1))
        rows = [i for i, r in enumerate(records) if r["blur"]]
        if rows:
            self._update_rows(crops, rows, lambda sub: self._blur(sub, [records[i]["sigma"] for i in rows]))
        if trace is not None:
            trace.extend(records)
        batch = torch.stack(crops).to(torch.float32)
        return list(torch.addcmul(self._shift, batch, self._scale).unbind(0))

    @staticmethod
    def _update_rows(crops: List[torch.Tensor], rows: List[int], op) -> None:
        """``crops[i] = op(batch of crops[rows])[j]`` for the j-th of ``rows`` (stacked once, no copy back)."""
        out = op(torch.stack([crops[i] for i in rows]))
        for j, i in enumerate(rows):
            crops[i] = out[j]

    @staticmethod
    def _draw_and_crop(image: torch.Tensor, size: int, scale, generator: Optional[torch.Generator], name: str):
        """One crop's uniforms, trace record, resized and flipped crop, and jitter order."""
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
        return u, record, crop, order

    def _view(self, image: torch.Tensor, size: int, scale, blur_p: float, solarize_p: float,
              generator: Optional[torch.Generator], trace: Optional[List[dict]], name: str) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        u, record, crop, order = self._draw_and_crop(image, size, scale, generator, name)
        k = 4 * CROP_ATTEMPTS
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
    if str(cfg.data.augmentation) == "histology":  # the DINOv2 recipe plus stain jitter and right-angle turns
        from .histology import histology_augmentation

        return histology_augmentation(cfg, build_multicrop_augmentation)
    aug = MultiCropAugmentation(
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
        min_source_px_per_patch=float(cfg.crops.min_source_px_per_patch),
    )
    area = aug.enlarged_below()
    if area:
        log.info("crops: images under %d pixels (about %.0f x %.0f) get larger crops than crops.*_scale, so that each "
                 "patch of a view keeps a source pixel (crops.min_source_px_per_patch=%g; 0 turns this off)",
                 math.ceil(area), math.sqrt(area), math.sqrt(area), aug.min_source_px_per_patch)
    return aug
