"""Optional device-side (GPU) multi-crop augmentation: decode on CPU, augment the whole batch on the device.

The CPU pipeline (`augmentations.MultiCropAugmentation`) augments one image at a time in the loader workers;
with few CPU cores per GPU that can starve the GPU. Here the workers only decode (uint8) and draw the random
numbers; the batch is then augmented on the device with batched kernels, every crop with its own parameters:

  random resized crop (bicubic) -> horizontal flip -> colour jitter (random op order, p) -> grayscale (p)
  ["mri": no hue/saturation/grayscale, random gamma instead] -> Gaussian blur (kernel 9, p per crop type)
  -> solarize (2nd global crop only) -> ["mri": additive noise] -> normalise

Same recipe, same random numbers. The recipe values are read from the CPU pipeline (`recipe_from_config` builds
the CPU augmentation and copies its settings; the fixed values are `augmentations`' own constants). Each crop
consumes a row of `DRAWS_PER_CROP` uniforms laid out exactly as the CPU pipeline's `_view` reads them (crop-box
attempts, flip, jitter, grayscale/gamma, op order, factors, blur, sigma, solarize, noise), so:
- with a batch generator (`BatchedMultiCrop(recipe, device)(images, generator=g)`), every crop gets independent
  parameters with the CPU pipeline's distributions;
- through the loader (`DeviceAugmentDraws` in `MultiCropDataset`, seeded per sample from (seed, position)),
  every crop gets *the very parameters* the CPU pipeline would have drawn for that sample: same boxes, flips,
  jitter orders and factors, blur sigmas, solarize decisions (the "mri" noise pixels excepted).

Differences from the per-image CPU pipeline, by design:
- resize: bicubic `grid_sample` on float values; when crops shrink by >= 1.5x the output is supersampled
  (s x s bicubic samples per output pixel, s = round(shrink) <= 4) and box-averaged: an antialiasing filter close
  to, not identical with, torchvision's antialiased bicubic (max difference ~1/255 on smooth images);
- colour ops run in float32 on [0, 1] with no rounding to uint8 between ops (torchvision's uint8 kernels
  truncate after each op, a bias of up to -1/255 per op);
- images of different sizes are padded to one canvas by edge replication; boxes are drawn for each image's own
  size, so only bicubic taps at an image border read the padding, which equals border clamping;
- "mri" noise is drawn on the device from a seeded generator, so its pixels differ from the CPU path's.

Output: the SSL collate's crop-major layout, `collated_global_crops` (2B, 3, G, G) = [crop 1 of every image;
crop 2 of every image] and `collated_local_crops` (n_local * B, 3, L, L), float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import augmentations as cpu_aug

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
JITTER_OP_NAMES = ("brightness", "contrast", "saturation", "hue")
MAX_SUPERSAMPLE = 4

# Layout of one crop's uniforms, mirroring augmentations.MultiCropAugmentation._view.
CROP_ATTEMPTS = cpu_aug.CROP_ATTEMPTS
DRAWS_PER_CROP = cpu_aug.DRAWS_PER_CROP
_K = 4 * CROP_ATTEMPTS  # attempts use u[4a : 4a + 4] = (area, log-aspect, top, left)
U_FLIP, U_JITTER, U_GRAY_OR_GAMMA = _K, _K + 1, _K + 2
U_ORDER = slice(_K + 3, _K + 7)  # argsort = random permutation of the four jitter ops
U_FACTORS = slice(_K + 7, _K + 11)  # brightness, contrast, saturation, hue
U_GAMMA, U_BLUR, U_SIGMA, U_SOLARIZE, U_NOISE, U_NOISE_SIGMA = (_K + 11, _K + 12, _K + 13, _K + 14, _K + 15,
                                                                 _K + 16)
CROP_KINDS = ("global_1", "global_2", "local")


@dataclass(frozen=True)
class AugmentRecipe:
    """Every number of the multi-crop recipe; build it with `recipe_from_config`/`recipe_from_augmentation`."""

    preset: str  # "dinov2" | "mri"
    global_crops_size: int
    local_crops_size: int
    global_crops_scale: Tuple[float, float]
    local_crops_scale: Tuple[float, float]
    local_crops_number: int
    blur_probabilities: Tuple[float, float, float]  # global 1, global 2, local
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    ratio: Tuple[float, float] = cpu_aug.CROP_RATIO
    flip_p: float = 0.5
    jitter_p: float = cpu_aug.JITTER_P
    brightness: float = cpu_aug.JITTER["brightness"]
    contrast: float = cpu_aug.JITTER["contrast"]
    saturation: float = cpu_aug.JITTER["saturation"]
    hue: float = cpu_aug.JITTER["hue"]
    grayscale_p: float = cpu_aug.GRAYSCALE_P
    blur_kernel_size: int = cpu_aug.BLUR_KERNEL
    blur_sigma: Tuple[float, float] = cpu_aug.BLUR_SIGMA
    solarize_p: float = cpu_aug.SOLARIZE_P  # second global crop only
    solarize_threshold: float = cpu_aug.SOLARIZE_THRESHOLD / 255.0  # on [0, 1] values
    gamma_range: Tuple[float, float] = cpu_aug.MRI_GAMMA  # "mri" only
    gamma_p: float = cpu_aug.MRI_GAMMA_P
    noise_sigma: Tuple[float, float] = cpu_aug.MRI_NOISE_SIGMA
    noise_p: float = cpu_aug.MRI_NOISE_P
    patch_size: Optional[int] = None  # with min_source_px_per_patch: `augmentations.source_limited_scale`
    min_source_px_per_patch: float = 0.0

    @property
    def channels(self) -> int:
        """Channels the crops are processed in: "mri" works on one (gray) channel, repeated by normalisation."""
        return 1 if self.preset == "mri" else 3

    @property
    def jitter_ops(self) -> Tuple[str, ...]:
        return ("brightness", "contrast") if self.preset == "mri" else JITTER_OP_NAMES

    def crop_kinds(self) -> List[Tuple[str, int, int]]:
        """(kind, crops per image, output size) in the order the CPU pipeline draws them."""
        return [("global_1", 1, self.global_crops_size), ("global_2", 1, self.global_crops_size),
                ("local", self.local_crops_number, self.local_crops_size)]

    @property
    def crops_per_image(self) -> int:
        return 2 + self.local_crops_number

    def scale_of(self, kind: str) -> Tuple[float, float]:
        return self.local_crops_scale if kind == "local" else self.global_crops_scale

    def scales_for(self, kind: str, heights: Tensor, widths: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-row (low, high) crop scales: `augmentations.source_limited_scale` for images of these sizes."""
        size = self.local_crops_size if kind == "local" else self.global_crops_size
        # the CPU pipeline's own formula, once per distinct image size (a batch has few)
        sizes, row_size = torch.unique(torch.stack([heights, widths], 1), dim=0, return_inverse=True)
        ranges = torch.tensor([cpu_aug.source_limited_scale(h, w, size, self.scale_of(kind), self.patch_size,
                                                            self.min_source_px_per_patch)
                               for h, w in sizes.tolist()], dtype=torch.float64).reshape(-1, 2)
        low, high = ranges[row_size].unbind(1)
        return low, high

    def blur_p_of(self, kind: str) -> float:
        return self.blur_probabilities[CROP_KINDS.index(kind)]

    def solarize_p_of(self, kind: str) -> float:
        return self.solarize_p if kind == "global_2" else 0.0


def recipe_from_augmentation(aug: "cpu_aug.MultiCropAugmentation") -> AugmentRecipe:
    """The recipe of an existing CPU `MultiCropAugmentation` (its sizes, scales, preset, blur mode, mean/std)."""
    return AugmentRecipe(
        preset=aug.preset,
        global_crops_size=aug.global_crops_size,
        local_crops_size=aug.local_crops_size,
        global_crops_scale=tuple(aug.global_crops_scale),
        local_crops_scale=tuple(aug.local_crops_scale),
        local_crops_number=aug.local_crops_number,
        blur_probabilities=tuple(aug.blur_probabilities),
        mean=tuple(float(v) for v in aug.mean.flatten()),
        std=tuple(float(v) for v in aug.std.flatten()),
        jitter_p=aug.jitter_p,
        grayscale_p=aug.grayscale_p,
        gamma_p=aug.gamma_p,
        noise_p=aug.noise_p,
        patch_size=aug.patch_size,
        min_source_px_per_patch=aug.min_source_px_per_patch,
    )


def recipe_from_config(cfg) -> AugmentRecipe:
    """The recipe of the config's CPU pipeline (`build_multicrop_augmentation(cfg)`), so both always agree."""
    return recipe_from_augmentation(cpu_aug.build_multicrop_augmentation(cfg))


# ---------------------------------------------------------------------------------------------- parameters


@dataclass
class CropParams:
    """Random parameters of n crops of one kind (CPU tensors, one row per crop)."""

    boxes: Tensor  # (n, 4) long: top, left, height, width in the image's own pixels
    flip: Tensor  # (n,) bool
    jitter: Tensor  # (n,) bool: colour jitter applied
    jitter_order: Tensor  # (n, 4) long: the ops of JITTER_OP_NAMES in the order they are applied
    jitter_factors: Tensor  # (n, 4) float: brightness, contrast, saturation factors; hue shift
    grayscale: Tensor  # (n,) bool ("dinov2")
    gamma: Tensor  # (n,) float, 1 = not applied ("mri")
    blur: Tensor  # (n,) bool
    blur_sigma: Tensor  # (n,) float
    solarize: Tensor  # (n,) bool
    noise_sigma: Tensor  # (n,) float, 0 = no noise ("mri")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def select(self, rows: Tensor) -> "CropParams":
        return CropParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def crop_boxes_from_uniforms(u: Tensor, heights: Tensor, widths: Tensor, scale: Sequence,
                             ratio: Sequence[float] = cpu_aug.CROP_RATIO) -> Tensor:
    """Batched `augmentations.sample_crop_box` (torchvision's RandomResizedCrop.get_params): (n, 4) boxes.

    u: (n, >= 4 * CROP_ATTEMPTS) uniforms; attempt a reads u[:, 4a:4a+4] = (area, log-aspect, top, left).
    scale: (low, high), each a float or an (n,) tensor (one range per row).
    The first attempt whose rounded width/height fit wins; otherwise the centred crop with clamped aspect.
    """
    u = u.to(torch.float64)
    n = u.shape[0]
    height, width = heights.to(torch.float64).view(n, 1), widths.to(torch.float64).view(n, 1)
    tries = u[:, :_K].view(n, CROP_ATTEMPTS, 4)
    low, high = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1) for v in scale)
    target = height * width * (low + (high - low) * tries[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = torch.round(torch.sqrt(target * aspect))  # half to even, like Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(dim=1)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first True (0 when none)
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    height, width = height.view(n), width.view(n)
    top = torch.floor(tries[rows, first, 2] * (height - h + 1))
    left = torch.floor(tries[rows, first, 3] * (width - w + 1))
    # Fallback: the centred crop, aspect ratio clamped into [ratio[0], ratio[1]].
    in_ratio = width / height
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fb_w = torch.where(wide, torch.round(height * ratio[1]), width)
    fb_h = torch.where(narrow, torch.round(width / ratio[0]), height)
    fb_top, fb_left = torch.floor((height - fb_h) / 2), torch.floor((width - fb_w) / 2)
    boxes = torch.stack([torch.where(found, top, fb_top), torch.where(found, left, fb_left),
                         torch.where(found, h, fb_h), torch.where(found, w, fb_w)], dim=1)
    return boxes.to(torch.long)


def params_from_uniforms(u: Tensor, heights: Tensor, widths: Tensor, recipe: AugmentRecipe, kind: str
                         ) -> CropParams:
    """Map each crop's row of DRAWS_PER_CROP uniforms to its parameters, as the CPU pipeline's `_view` does.

    u: (n, DRAWS_PER_CROP) float64; heights/widths: (n,) size of the image each crop is cut from.
    """
    if u.ndim != 2 or u.shape[1] != DRAWS_PER_CROP:
        raise ValueError(f"expected uniforms of shape (n, {DRAWS_PER_CROP}), got {tuple(u.shape)}")
    u = u.to(torch.float64)
    n = u.shape[0]
    boxes = crop_boxes_from_uniforms(u, heights, widths, recipe.scales_for(kind, heights, widths), recipe.ratio)
    lows = torch.tensor([1 - recipe.brightness, 1 - recipe.contrast, 1 - recipe.saturation, -recipe.hue],
                        dtype=torch.float64)
    spans = torch.tensor([2 * recipe.brightness, 2 * recipe.contrast, 2 * recipe.saturation, 2 * recipe.hue],
                         dtype=torch.float64)
    factors = (lows + spans * u[:, U_FACTORS]).float()
    mri = recipe.preset == "mri"
    third = u[:, U_GRAY_OR_GAMMA]  # grayscale decision ("dinov2") or gamma decision ("mri")
    g_lo, g_hi = math.log(recipe.gamma_range[0]), math.log(recipe.gamma_range[1])
    gamma_on = (third < recipe.gamma_p) if mri else torch.zeros(n, dtype=torch.bool)
    gamma = torch.where(gamma_on, torch.exp(g_lo + (g_hi - g_lo) * u[:, U_GAMMA]), torch.ones(n, dtype=torch.float64))
    noise_on = (u[:, U_NOISE] < recipe.noise_p) if mri else torch.zeros(n, dtype=torch.bool)
    s_lo, s_hi = recipe.noise_sigma
    noise_sigma = torch.where(noise_on, s_lo + (s_hi - s_lo) * u[:, U_NOISE_SIGMA], torch.zeros(n, dtype=torch.float64))
    sigma_lo, sigma_hi = recipe.blur_sigma
    return CropParams(
        boxes=boxes,
        flip=u[:, U_FLIP] < recipe.flip_p,
        jitter=u[:, U_JITTER] < recipe.jitter_p,
        jitter_order=torch.argsort(u[:, U_ORDER], dim=1),
        jitter_factors=factors,
        grayscale=(third < recipe.grayscale_p) if not mri else torch.zeros(n, dtype=torch.bool),
        gamma=gamma.float(),
        blur=u[:, U_BLUR] < recipe.blur_p_of(kind),
        blur_sigma=(sigma_lo + (sigma_hi - sigma_lo) * u[:, U_SIGMA]).float(),
        solarize=u[:, U_SOLARIZE] < recipe.solarize_p_of(kind),
        noise_sigma=noise_sigma.float(),
    )


def split_uniforms(uniforms: Tensor, recipe: AugmentRecipe) -> Dict[str, Tensor]:
    """(B, crops_per_image, D) per-image draws -> {kind: (n_kind * B, D)} in crop-major row order
    (crop j of image i at row j * B + i), the order of the collated batch."""
    batch = uniforms.shape[0]
    if uniforms.shape[1:] != (recipe.crops_per_image, DRAWS_PER_CROP):
        raise ValueError(f"uniforms must be (B, {recipe.crops_per_image}, {DRAWS_PER_CROP}), "
                         f"got {tuple(uniforms.shape)}")
    out, start = {}, 0
    for kind, count, _ in recipe.crop_kinds():
        out[kind] = uniforms[:, start:start + count].transpose(0, 1).reshape(count * batch, DRAWS_PER_CROP)
        start += count
    return out


# ---------------------------------------------------------------------------------------------- pixels


def images_to_canvas(images: Sequence[Tensor], channels: int = 3, pin_memory: bool = False
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """uint8 (C, H_i, W_i) images -> canvas uint8 (B, C, H_max, W_max), heights (B,), widths (B,).

    Each image sits at the top-left; its last row/column is replicated into the padding, so bicubic taps that
    fall outside an image read its edge value (border clamping), as a per-image resize would.
    """
    if not images:
        raise ValueError("images_to_canvas needs at least one image")
    for i, image in enumerate(images):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != channels:
            raise ValueError(f"image {i}: expected a uint8 tensor ({channels}, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
    heights = torch.tensor([int(im.shape[1]) for im in images])
    widths = torch.tensor([int(im.shape[2]) for im in images])
    h_max, w_max = int(heights.max()), int(widths.max())
    canvas = torch.empty(len(images), channels, h_max, w_max, dtype=torch.uint8, pin_memory=pin_memory)
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        canvas[i, :, :h, :w] = image
        if w < w_max:
            canvas[i, :, :h, w:] = image[:, :, w - 1:w]
        if h < h_max:
            canvas[i, :, h:, :] = canvas[i, :, h - 1:h, :]
    return canvas, heights, widths


def supersample_factor(boxes: Tensor, size: int, max_factor: int = MAX_SUPERSAMPLE) -> int:
    """Bicubic samples per output pixel side: the batch's largest shrink factor, rounded, in [1, max_factor]."""
    shrink = float(boxes[:, 2:].max()) / size
    return int(min(max_factor, max(1, round(shrink))))


def resized_crops(canvas: Tensor, boxes: Tensor, n_per_image: int, size: int, antialias: bool = True) -> Tensor:
    """Cut and resize crops: canvas (B, C, H, W) -> (n_per_image * B, C, size, size) float in [0, 1].

    boxes: (n_per_image * B, 4) crop-major (crop j of image i at row j * B + i). The crops of one image are
    stacked along the sampling grid's height, so one `grid_sample` call serves the batch without copying
    images. Pixel-centre convention of resize(align_corners=False): output pixel u of a crop starting at `left`
    with width w samples source x = left + (u + 0.5) * w / size - 0.5.
    """
    batch, channels, canvas_h, canvas_w = canvas.shape
    device = canvas.device
    ss = supersample_factor(boxes, size) if antialias else 1
    samples = size * ss
    top, left, height, width = boxes.to(device=device, dtype=torch.float32).unbind(1)
    steps = (torch.arange(samples, device=device, dtype=torch.float32) + 0.5) / samples  # (S,) in (0, 1)
    # Normalised coordinates (align_corners=False): x_norm = 2 * (x_pixel + 0.5) / W - 1.
    xs = (left[:, None] + steps[None] * width[:, None]) * (2.0 / canvas_w) - 1.0  # (n, S)
    ys = (top[:, None] + steps[None] * height[:, None]) * (2.0 / canvas_h) - 1.0  # (n, S)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (n, S, S, 2): x, y
    grid = grid.view(n_per_image, batch, samples, samples, 2).transpose(0, 1)  # per image: its crops
    grid = grid.reshape(batch, n_per_image * samples, samples, 2)
    source = canvas.float().div_(255.0) if canvas.dtype == torch.uint8 else canvas.float()
    out = F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False)
    if ss > 1:
        out = F.avg_pool2d(out, kernel_size=ss, stride=ss)  # box filter over each output pixel's footprint
    out = out.view(batch, channels, n_per_image, size, size).permute(2, 0, 1, 3, 4)
    return out.reshape(n_per_image * batch, channels, size, size).clamp_(0.0, 1.0)  # bicubic overshoots


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma; a 1-channel image is its own gray level."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, rgb_to_grayscale(x), factor)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    gray = maxc == minc
    delta = maxc - minc
    sat = delta / torch.where(gray, torch.ones_like(maxc), maxc)
    delta = torch.where(gray, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / delta, (maxc - g) / delta, (maxc - b) / delta
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    return torch.stack([torch.fmod(hue / 6.0 + 1.0, 1.0), sat, maxc], dim=1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    hue, sat, val = x.unbind(1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.to(torch.int64) % 6
    p = (val * (1.0 - sat)).clamp(0.0, 1.0)
    q = (val * (1.0 - sat * frac)).clamp(0.0, 1.0)
    t = (val * (1.0 - sat * (1.0 - frac))).clamp(0.0, 1.0)
    # Hue sector i picks (r, g, b) among (v, t, p, q).
    table = torch.stack([torch.stack([val, q, p, p, t, val]),
                         torch.stack([t, val, val, q, p, p]),
                         torch.stack([p, p, t, val, val, q])])  # (3, 6, n, H, W)
    index = sector.unsqueeze(0).unsqueeze(0).expand(3, 1, *sector.shape)
    return table.gather(1, index).squeeze(1).transpose(0, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


JITTER_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
              "hue": adjust_hue}


def _update_rows(x: Tensor, rows: Tensor, fn) -> Tensor:
    """x with rows `rows` (CPU long indices) replaced by fn(x[rows], rows); nothing to do when empty."""
    if rows.numel() == 0:
        return x
    rows_dev = rows.to(x.device, non_blocking=True)
    x[rows_dev] = fn(x[rows_dev], rows)
    return x


def _rows(mask: Tensor) -> Tensor:
    return torch.nonzero(mask).flatten()


def color_jitter(x: Tensor, params: CropParams, ops: Sequence[str]) -> Tensor:
    """Colour jitter of the crops with params.jitter, each in its own random op order (ops not in `ops` are
    skipped, as the CPU "mri" preset does). At position k of the order, the crops whose k-th op is `op` get it
    with their factor: at most 4 x 4 batched calls, each crop visited once per op. Index sets are computed from
    CPU parameters, so there is no device synchronisation."""
    for position in range(len(JITTER_OP_NAMES)):
        for op_id, name in enumerate(JITTER_OP_NAMES):
            if name not in ops:
                continue
            rows = _rows(params.jitter & (params.jitter_order[:, position] == op_id))
            x = _update_rows(x, rows, lambda crops, idx, op_id=op_id, name=name: JITTER_OPS[name](
                crops, params.jitter_factors[idx, op_id].to(device=crops.device, dtype=crops.dtype)))
    return x


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """(n,) sigmas -> (n, kernel_size) normalised 1-D Gaussians (torchvision's discretisation)."""
    half = (kernel_size - 1) / 2.0
    positions = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    pdf = torch.exp(-0.5 * (positions[None] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding: (n, C, H, W) -> (n, C, H, W)."""
    n, c, h, w = x.shape
    kernels = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (n * C, k)
    pad = kernel_size // 2
    flat = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # along width
    flat = F.conv2d(flat, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # along height
    return flat.view(n, c, h, w)


def augment_crops(canvas: Tensor, params: CropParams, recipe: AugmentRecipe, n_per_image: int, size: int,
                  antialias: bool = True, noise_generator: Optional[torch.Generator] = None,
                  normalize: bool = True) -> Tensor:
    """Every augmentation of one crop kind, in the CPU pipeline's order; returns (n_per_image * B, 3, size, size)
    normalised float32 crops (values in [0, 1], with `recipe.channels` channels, when normalize=False)."""
    device = canvas.device
    x = resized_crops(canvas, params.boxes, n_per_image, size, antialias=antialias)
    x = torch.where(params.flip.to(device, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)
    x = color_jitter(x, params, recipe.jitter_ops)
    if recipe.preset == "mri":
        x = _update_rows(x, _rows(params.gamma != 1.0), lambda crops, idx: crops.pow(
            params.gamma[idx].to(device).view(-1, 1, 1, 1)))
    else:
        x = _update_rows(x, _rows(params.grayscale), lambda crops, idx: rgb_to_grayscale(crops).expand_as(crops))
    x = _update_rows(x, _rows(params.blur), lambda crops, idx: gaussian_blur(
        crops, params.blur_sigma[idx].to(device), recipe.blur_kernel_size))
    threshold = recipe.solarize_threshold
    x = _update_rows(x, _rows(params.solarize), lambda crops, idx: torch.where(crops >= threshold, 1.0 - crops, crops))
    if recipe.preset == "mri":
        def add_noise(crops, idx):
            noise = torch.randn(crops.shape, generator=noise_generator, device=device, dtype=crops.dtype)
            return (crops + noise * params.noise_sigma[idx].to(device).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

        x = _update_rows(x, _rows(params.noise_sigma > 0), add_noise)
    if not normalize:
        return x
    mean = torch.tensor(recipe.mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std  # a 1-channel ("mri") crop broadcasts to 3 channels here


# ---------------------------------------------------------------------------------------------- entry points


class BatchedMultiCrop:
    """Device-side multi-crop of a batch of uint8 images.

    ``BatchedMultiCrop(recipe, device)(images, generator=g)`` draws every crop's uniforms from `g` (CPU) and
    returns ``{"collated_global_crops", "collated_local_crops", "params"}`` on `device`. `augment_canvas` does the
    same for a canvas and per-image uniforms prepared by the loader (`DeviceAugmentCollate`).
    """

    def __init__(self, recipe: AugmentRecipe, device="cuda", antialias: bool = True):
        self.recipe = recipe
        self.device = torch.device(device)
        self.antialias = antialias

    def draw_uniforms(self, batch_size: int, generator: Optional[torch.Generator]) -> Tensor:
        """(B, crops_per_image, DRAWS_PER_CROP) independent uniforms."""
        return torch.rand(batch_size, self.recipe.crops_per_image, DRAWS_PER_CROP, generator=generator,
                          dtype=torch.float64)

    def sample_params(self, uniforms: Tensor, heights: Tensor, widths: Tensor) -> Dict[str, CropParams]:
        """Per-kind parameters (crop-major rows) from per-image uniforms and image sizes."""
        per_kind = split_uniforms(uniforms, self.recipe)
        params = {}
        for kind, count, _ in self.recipe.crop_kinds():
            index = torch.arange(heights.shape[0]).repeat(count)  # the image of each crop-major row
            params[kind] = params_from_uniforms(per_kind[kind], heights[index], widths[index], self.recipe, kind)
        return params

    def augment_canvas(self, canvas: Tensor, heights: Tensor, widths: Tensor, uniforms: Tensor,
                       noise_seed: int = 0) -> Dict[str, Any]:
        """Crops of a prepared canvas (any device; moved to `self.device`) and per-image uniforms."""
        canvas = canvas.to(self.device, non_blocking=True)
        params = self.sample_params(uniforms, heights, widths)
        noise_generator = None
        if self.recipe.preset == "mri":
            noise_generator = torch.Generator(device=self.device).manual_seed(int(noise_seed))
        crops = {}
        for kind, count, size in self.recipe.crop_kinds():
            if count == 0:
                crops[kind] = torch.zeros(0, 3, size, size, device=self.device)
                continue
            crops[kind] = augment_crops(canvas, params[kind], self.recipe, count, size, antialias=self.antialias,
                                        noise_generator=noise_generator)
        return {
            "collated_global_crops": torch.cat([crops["global_1"], crops["global_2"]]),  # (2B, 3, G, G)
            "collated_local_crops": crops["local"],  # (n_local * B, 3, L, L)
            "params": params,
        }

    def __call__(self, images: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """images: uint8 (C, H_i, W_i) tensors with C = recipe.channels (see `DeviceAugmentDraws.prepare_image`)."""
        images = [DeviceAugmentDraws.prepare_image(im, self.recipe) for im in images]
        canvas, heights, widths = images_to_canvas(images, self.recipe.channels,
                                                   pin_memory=self.device.type == "cuda")
        uniforms = self.draw_uniforms(len(images), generator)
        noise_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return self.augment_canvas(canvas, heights, widths, uniforms, noise_seed)


class DeviceAugmentDraws:
    """Loader-side transform for `MultiCropDataset`: decode only, and draw the sample's uniforms from its
    generator in the CPU pipeline's order and amount (including the "mri" noise draws, which are discarded),
    so the device receives the parameters the CPU pipeline would have used for that sample.

    ``__call__(image, generator=None) -> {"image": uint8 (C, H, W), "uniforms": (crops_per_image, D) float64}``
    """

    def __init__(self, recipe: AugmentRecipe, max_side: int = 0):
        self.recipe = recipe
        self.max_side = int(max_side)

    @staticmethod
    def prepare_image(image, recipe: AugmentRecipe) -> Tensor:
        """Channel handling of the CPU pipeline: "mri" -> 1 gray channel, "dinov2" -> 3 channels."""
        image = cpu_aug.to_uint8_chw(image)
        if recipe.preset == "mri":
            return cpu_aug.single_channel(image)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image

    @staticmethod
    def bound_size(image: Tensor, max_side: int) -> Tensor:
        """uint8 (C, H, W) shrunk (antialiased bilinear) so that its longer side is at most ``max_side`` (0: as is).
        The crop boxes are drawn as fractions of the image, so only the source resolution changes."""
        height, width = image.shape[-2:]
        if max_side <= 0 or max(height, width) <= max_side:
            return image
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        small = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return small[0].round().clamp(0, 255).to(torch.uint8)

    def __call__(self, image, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        image = self.bound_size(self.prepare_image(image, self.recipe), self.max_side)
        rows = []
        for kind, count, size in self.recipe.crop_kinds():
            for _ in range(count):
                u = torch.rand(DRAWS_PER_CROP, generator=generator, dtype=torch.float64)
                rows.append(u)
                if self.recipe.preset == "mri" and float(u[U_NOISE]) < self.recipe.noise_p:
                    # The CPU pipeline draws its noise here from the same generator; keep the stream aligned.
                    torch.randn((image.shape[0], size, size), generator=generator, dtype=torch.float32)
        return {"image": image, "uniforms": torch.stack(rows)}


class DeviceAugmentCollate:
    """Collate for `DeviceAugmentDraws` samples: a padded uint8 canvas, image sizes, uniforms, and the iBOT masks
    drawn by the data package's own collate with the same RNG as `SSLCollate` (identical masks).

    Returns ``canvas (B, C, H, W) uint8, heights (B,), widths (B,), uniforms (B, crops, D), noise_seed`` plus the
    SSL batch's mask keys, ``n_skipped`` and ``skipped_paths``. `augment_batch` turns it into the SSL batch.
    """

    def __init__(self, recipe: AugmentRecipe, mask_generator, mask_ratio_tuple: Sequence[float] = (0.1, 0.5),
                 mask_probability: float = 0.5, seed: int = 0, pin_memory: bool = False):
        self.recipe = recipe
        self.mask_generator = mask_generator
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = float(mask_probability)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)

    def __call__(self, samples: Sequence[Any]) -> Dict[str, Any]:
        import numpy as np

        from .collate import unpack_sample, collate_data_and_cast, mask_rng_for_positions

        kept, placeholders, positions = [], [], []
        for sample in samples:
            draws, _, position = unpack_sample(sample)
            positions.append(position)
            if draws is not None:
                kept.append(draws)
            # The real collate draws the masks; it only needs the crop counts, so give it empty crops.
            empty = {"global_crops": [torch.empty(0)] * 2,
                     "local_crops": [torch.empty(0)] * self.recipe.local_crops_number}
            if draws is None:
                placeholders.append(sample)  # counted (and its path reported) as skipped by the collate
            elif isinstance(sample, dict):
                placeholders.append(dict(sample, crops=empty))
            else:
                placeholders.append((empty, None))
        rng = (mask_rng_for_positions(self.seed, positions) if positions and all(p is not None for p in positions)
               else np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)))))
        batch = collate_data_and_cast(placeholders, self.mask_ratio_tuple, self.mask_probability,
                                      n_tokens=self.mask_generator.num_patches, mask_generator=self.mask_generator,
                                      rng=rng)
        del batch["collated_global_crops"], batch["collated_local_crops"]
        canvas, heights, widths = images_to_canvas([d["image"] for d in kept], self.recipe.channels,
                                                   pin_memory=self.pin_memory)
        batch.update(canvas=canvas, heights=heights, widths=widths,
                     uniforms=torch.stack([d["uniforms"] for d in kept]),
                     noise_seed=int(rng.integers(0, 2 ** 62)))
        return batch


class DeviceAugmentedLoader:
    """Iterates a `DeviceAugmentCollate` loader and augments each batch on the device, in the caller's (the
    training step's) stream: ``for batch in DeviceAugmentedLoader(loader, augment)`` gives SSL batches."""

    def __init__(self, loader, augment: BatchedMultiCrop):
        self.loader, self.augment = loader, augment

    def __iter__(self):
        for batch in self.loader:
            yield augment_batch(self.augment, batch)


def augment_batch(augment: BatchedMultiCrop, batch: Dict[str, Any]) -> Dict[str, Any]:
    """A `DeviceAugmentCollate` batch -> the SSL batch (crops on the device, mask keys passed through)."""
    crops = augment.augment_canvas(batch["canvas"], batch["heights"], batch["widths"], batch["uniforms"],
                                   batch["noise_seed"])
    out = {k: v for k, v in batch.items() if k not in ("canvas", "heights", "widths", "uniforms", "noise_seed")}
    out["collated_global_crops"] = crops["collated_global_crops"]
    out["collated_local_crops"] = crops["collated_local_crops"]
    return out
