"""Decode an image file to a 3-channel uint8 tensor (3, H, W), whatever its storage format.

Fast path: `torchvision.io.decode_image` (libjpeg-turbo / libpng) for JPEG and PNG, which expands grayscale,
palette, 1-bit and alpha images to RGB exactly like PIL's ``convert("RGB")``. Everything else (TIFF, BMP, odd
PNGs) goes through PIL.

High-bit-depth images (16-bit PNG/TIFF, PIL modes ``I;16*``, ``I`` and ``F``) cannot be cast to uint8 without
losing everything but the top bits, and MRI exports rarely use the full 16-bit range. They are rescaled *per image*
to 0..255 (all channels together, so colour balance is kept):

- ``"minmax"`` (default): ``out = round(255 * (x - min) / (max - min))``; a constant image becomes all zeros.
- ``"percentile"``: the same with min/max replaced by the 0.5th and 99.5th percentiles and values clipped, which
  is robust to a few hot pixels.

8-bit images are never rescaled: their stored values are kept as they are.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
RESCALE_MODES = ("minmax", "percentile")
PERCENTILE_RANGE = (0.5, 99.5)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_HIGH_DEPTH_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F")


class ImageDecodeError(RuntimeError):
    """A file that exists but cannot be decoded as an image; the message names the path."""


def is_image_file(path: os.PathLike | str, extensions=IMG_EXTENSIONS) -> bool:
    """True when the file name ends in one of ``extensions`` (case-insensitive)."""
    return str(path).lower().endswith(tuple(e.lower() for e in extensions))


def rescale_to_uint8(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Map a high-bit-depth array to uint8 per image (see module docstring for the two modes)."""
    if mode not in RESCALE_MODES:
        raise ValueError(f"rescale mode must be one of {RESCALE_MODES}, got {mode!r}")
    x = values.astype(np.float64, copy=False)
    finite = np.isfinite(x)
    if not finite.all():  # float TIFFs can hold NaN/inf; treat them as the lowest value
        x = np.where(finite, x, np.nan)
        low_fill = np.nanmin(x) if finite.any() else 0.0
        x = np.nan_to_num(x, nan=low_fill, posinf=low_fill, neginf=low_fill)
    if mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = (float(v) for v in np.percentile(x, PERCENTILE_RANGE))
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    scaled = np.floor((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo)) + 0.5)
    return scaled.astype(np.uint8)


def _to_three_channels(chw: torch.Tensor) -> torch.Tensor:
    """(C, H, W) with C in {1, 2, 3, 4} -> (3, H, W): gray is repeated, alpha dropped."""
    c = chw.shape[0]
    if c in (1, 2):
        return chw[:1].expand(3, -1, -1).contiguous()
    return chw[:3].contiguous()


def _png_bit_depth(head: bytes) -> Optional[int]:
    # IHDR is always the first chunk: 8-byte signature, 4-byte length, b"IHDR", width, height, bit depth.
    if len(head) >= 25 and head[12:16] == b"IHDR":
        return head[24]
    return None


def _decode_torchvision(data: bytes, rescale: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # torchvision >= 0.29 deprecates its decoders (moving to TorchCodec) with a warning on every call; while
        # they exist they are the fastest path, and PIL takes over once they are gone.
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_torchvision_unchecked(data, rescale)


def _decode_torchvision_unchecked(data: bytes, rescale: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data.startswith(_PNG_SIGNATURE) and _png_bit_depth(data) == 16:
        raw = decode_image(buffer, mode=ImageReadMode.UNCHANGED)  # uint16 (or int32 on old torchvision)
        raw = _to_three_channels(raw[: 1 if raw.shape[0] == 2 else min(3, raw.shape[0])])
        return torch.from_numpy(rescale_to_uint8(raw.to(torch.int32).numpy(), rescale))
    image = decode_image(buffer, mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # defensive: never hand a wider dtype to the uint8 pipeline
        return torch.from_numpy(rescale_to_uint8(image.to(torch.int32).numpy(), rescale))
    return image


def decode_pil_image(image, rescale: str = "minmax") -> torch.Tensor:
    """An already opened PIL image -> uint8 (3, H, W), with the high-bit-depth rescaling above."""
    if image.mode in _HIGH_DEPTH_PIL_MODES:
        array = np.asarray(image)
        gray = torch.from_numpy(rescale_to_uint8(array, rescale))
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode == "L":
        gray = torch.from_numpy(np.array(image, dtype=np.uint8))
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def decode_with_pil(path: os.PathLike | str, rescale: str = "minmax") -> torch.Tensor:
    """Reference decoder: PIL for every format (slower, used as fallback and in tests)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return decode_pil_image(image, rescale)


def decode_image_file(path: os.PathLike | str, rescale: str = "minmax") -> torch.Tensor:
    """Read ``path`` -> uint8 tensor (3, H, W). Raises `ImageDecodeError` (naming the path) on failure.

    JPEG/PNG use torchvision's decoder; anything it rejects falls back to PIL before giving up.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path}: {exc}") from exc
    if data.startswith(_PNG_SIGNATURE) or data.startswith(_JPEG_SIGNATURE):
        try:
            return _decode_torchvision(data, rescale)
        except Exception:
            pass  # truncated file, CMYK JPEG, ...: PIL may still manage, or it names the real problem
    try:
        return decode_with_pil(path, rescale)
    except Exception as exc:
        raise ImageDecodeError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc
