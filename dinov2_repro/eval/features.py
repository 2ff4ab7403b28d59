"""Frozen-backbone features for the linear probe and k-NN, extracted once and cached on disk.

What is extracted per image (the DINOv2 linear-probe inputs, Oquab et al. 2023, section 7):
- ``cls``: the CLS token after the final norm of each of the last ``n_last_blocks`` blocks, (N, n, D);
- ``patch_mean``: the average of the last block's normed patch tokens, (N, D).
A probe input is the concatenation of the last 1..n CLS tokens, optionally with ``patch_mean``; k-NN uses the
final CLS token (``cls[:, -1]``). A module without ``get_intermediate_layers`` contributes ``model(x)`` as its
only "CLS" (n = 1) and no patch tokens, which lets any feature extractor be plugged in.

The cache key hashes the backbone weights and description, the transform, the extraction settings and the image
list (path, label, size, modification time): changing any of them recomputes, the same inputs load from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..data.datasets import image_list_sha1, loader_workers
from ..models.weights import read_weights_file, write_tensor_file
from .dedup import difference_hash

CACHE_VERSION = 2


# ------------------------------------------------------------------------------------------------ transforms
class EvalTransform:
    """uint8 (3, H, W) -> float (3, crop, crop): resize the shorter side (bicubic, antialiased), centre crop,
    scale to [0, 1], normalise. ``resize_size == crop_size`` with ``squash`` resizes to crop x crop directly."""

    def __init__(self, resize_size: int, crop_size: int, mean: Sequence[float], std: Sequence[float],
                 squash: bool = False):
        self.resize_size, self.crop_size, self.squash = int(resize_size), int(crop_size), bool(squash)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        size = [self.crop_size, self.crop_size] if self.squash else [self.resize_size]
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, [self.crop_size, self.crop_size])
        image = image.float().div_(255.0)
        return TF.normalize(image, self.mean, self.std)

    def describe(self) -> Dict[str, Any]:
        return dict(kind="eval", resize_size=self.resize_size, crop_size=self.crop_size, squash=self.squash,
                    mean=self.mean, std=self.std, interpolation="bicubic")


def resolve_sizes(data_cfg, info: Dict[str, Any]) -> Tuple[int, int, List[float], List[float]]:
    """(resize, crop, mean, std) from the eval config, defaulting to what the backbone expects."""
    crop = int(data_cfg.crop_size) or int(info.get("eval_img_size") or 224)
    resize = int(data_cfg.resize_size) or int(round(crop / 0.875))
    mean = list(data_cfg.mean) or list(info["mean"])
    std = list(data_cfg.std) or list(info["std"])
    patch = info.get("patch_size")
    if patch and crop % int(patch):
        raise ValueError(f"data.crop_size = {crop} is not a multiple of the backbone's patch size {patch}")
    return resize, crop, mean, std


# ------------------------------------------------------------------------------------------------ feature sets
@dataclass
class FeatureSet:
    """Features of one split. cls (N, n_blocks, D), patch_mean (N, D) or None, labels (N,), paths (N)."""

    cls: Tensor
    patch_mean: Optional[Tensor]
    labels: Tensor
    paths: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # unreadable images (announced, never silently dropped)
    dhash: Optional[Tensor] = None  # (N, 256) bool difference hashes of the raw images (near-duplicate check)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.cls.shape[1])

    def linear_input(self, n_blocks: int, avgpool: bool) -> Tensor:
        """(N, n_blocks * D [+ D]): the last ``n_blocks`` CLS tokens, then the mean patch token if ``avgpool``."""
        if n_blocks > self.n_blocks:
            raise ValueError(f"asked for the CLS of {n_blocks} blocks, only {self.n_blocks} were extracted")
        parts = [self.cls[:, -n_blocks:].flatten(1)]
        if avgpool:
            if self.patch_mean is None:
                raise ValueError("avgpool features requested but this backbone gives no patch tokens")
            parts.append(self.patch_mean)
        return torch.cat(parts, dim=1)

    def knn_input(self) -> Tensor:
        """(N, D) the final CLS token."""
        return self.cls[:, -1]

    def subset(self, indices) -> "FeatureSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FeatureSet(self.cls[idx], None if self.patch_mean is None else self.patch_mean[idx],
                          self.labels[idx], [self.paths[i] for i in idx.tolist()] if self.paths else [],
                          list(self.skipped), None if self.dhash is None else self.dhash[idx])

    def to_dict(self) -> Dict[str, Any]:
        return dict(cls=self.cls, patch_mean=self.patch_mean, labels=self.labels, paths=self.paths,
                    skipped=self.skipped, dhash=self.dhash)


# ------------------------------------------------------------------------------------------------ extraction
class IndexedImages(torch.utils.data.Dataset):
    """(index, transformed image or None, label[, difference hash]): keeps outputs aligned with the image list when
    some images cannot be decoded. The hash (see `dedup`) is computed from the decoded image, saving a second pass."""

    def __init__(self, dataset, transform, with_hash: bool = False):
        self.dataset, self.transform, self.with_hash = dataset, transform, with_hash

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = self.dataset.load_image(index)
        label = self.dataset.samples[index][1]
        if image is None:
            return index, None, label, None
        if self.with_hash:
            return index, self.transform(image), label, difference_hash(image)
        return index, self.transform(image), label, None


def collate_indexed(batch):
    """-> (dataset indices, images, labels, failed indices) or, with hashes, a 5th entry (N, bits)."""
    kept = [b for b in batch if b[1] is not None]
    failed = [b[0] for b in batch if b[1] is None]
    if not kept:
        return None, None, None, failed, None
    index = torch.tensor([b[0] for b in kept])
    images = torch.stack([b[1] for b in kept])
    labels = torch.tensor([b[2] for b in kept])
    hashes = torch.stack([b[3] for b in kept]) if kept[0][3] is not None else None
    return index, images, labels, failed, hashes


def effective_precision(device: Any, precision: str) -> str:
    """"bf16" when autocast will run ("bf16", or "auto" on CUDA), else "fp32"."""
    device = torch.device(device)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    return "fp32"


def autocast_context(device: Any, precision: str):
    """bf16 autocast on CUDA ("auto" or "bf16"); plain fp32 otherwise."""
    import contextlib

    device = torch.device(device)
    if effective_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def backbone_outputs(model, images: Tensor, n_last_blocks: int) -> Tuple[Tensor, Optional[Tensor]]:
    """(cls (B, n, D), patch_mean (B, D) or None) for a batch; see the module docstring."""
    if hasattr(model, "get_intermediate_layers"):
        n = min(n_last_blocks, len(model.blocks)) if hasattr(model, "blocks") else n_last_blocks
        outputs = model.get_intermediate_layers(images, n=n, return_class_token=True, norm=True)
        cls = torch.stack([class_token for _, class_token in outputs], dim=1)  # (B, n, D)
        patch_mean = outputs[-1][0].mean(dim=1)  # (B, D)
        return cls.float(), patch_mean.float()
    out = model(images)
    if out.dim() != 2:
        raise ValueError(f"a backbone without get_intermediate_layers must return (B, D) features, "
                         f"got shape {tuple(out.shape)}")
    return out.float().unsqueeze(1), None


def extract_features(model, dataset, transform, *, n_last_blocks: int = 4, batch_size: int = 64,
                     num_workers: int = 0, device: Any = "cpu", precision: str = "auto", progress: bool = False,
                     desc: str = "features") -> FeatureSet:
    """Run the frozen ``model`` over ``dataset`` (an `ImageFileDataset`) and gather a `FeatureSet`."""
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(IndexedImages(dataset, transform, with_hash=True), batch_size=batch_size,
                                         shuffle=False, num_workers=loader_workers(num_workers, len(dataset), batch_size),
                                         collate_fn=collate_indexed, pin_memory=device.type == "cuda")
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc=desc, unit="batch", leave=False)
    model.eval()
    indices, cls_parts, patch_parts, label_parts, hash_parts, failed = [], [], [], [], [], []
    for index, images, labels, bad, hashes in iterator:
        failed.extend(bad)
        if index is None:
            continue
        hash_parts.append(hashes)
        with autocast_context(device, precision):
            cls, patch_mean = backbone_outputs(model, images.to(device, non_blocking=True), n_last_blocks)
        indices.append(index)
        cls_parts.append(cls.cpu())
        label_parts.append(labels)
        if patch_mean is not None:
            patch_parts.append(patch_mean.cpu())
    if not indices:
        raise RuntimeError(f"{desc}: no image of {len(dataset)} could be decoded (e.g. {dataset.samples[0][0]})")
    order = torch.cat(indices)
    paths = [dataset.samples[i][0] for i in order.tolist()]
    return FeatureSet(torch.cat(cls_parts), torch.cat(patch_parts) if patch_parts else None, torch.cat(label_parts),
                      paths, sorted(dataset.samples[i][0] for i in failed), torch.cat(hash_parts))


# ------------------------------------------------------------------------------------------------ cache
def feature_cache_key(info: Dict[str, Any], transform, samples, n_last_blocks: int, precision: str) -> Dict[str, Any]:
    """Everything the features depend on, as a JSON-able dict (hashed to name the cache file)."""
    backbone = {k: info.get(k) for k in ("weights_sha1", "patch_size", "img_size", "num_register_tokens",
                                         "interpolate_offset", "interpolate_antialias", "depth", "module_class")}
    return dict(version=CACHE_VERSION, backbone=backbone, transform=transform.describe(),
                images=image_list_sha1(samples), n_images=len(samples), n_last_blocks=int(n_last_blocks),
                precision=precision)


def default_cache_dir() -> Path:
    """Where feature caches go unless ``cache_dir`` says otherwise: ``$DINOV2_REPRO_CACHE``, else
    ``$XDG_CACHE_HOME/dinov2_repro``, else ``~/.cache/dinov2_repro``. Entries are keyed by content (backbone
    weights, transform, image list), so every evaluation of the same backbone on the same images shares them,
    whatever its output folder, and a changed image or backbone never hits a stale entry."""
    if os.environ.get("DINOV2_REPRO_CACHE"):
        return Path(os.environ["DINOV2_REPRO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dinov2_repro"


def _key_hash(key: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cached_features(model, info: Dict[str, Any], dataset, transform, cache_dir: os.PathLike | str, split: str, *,
                    n_last_blocks: int = 4, batch_size: int = 64, num_workers: int = 0, device: Any = "cpu",
                    precision: str = "auto", progress: bool = False, log=print) -> Tuple[FeatureSet, bool]:
    """`extract_features` through the on-disk cache. Returns ``(features, cache_hit)``."""
    key = feature_cache_key(info, transform, dataset.samples, n_last_blocks,
                            f"{torch.device(device).type}/{effective_precision(device, precision)}")
    digest = _key_hash(key)
    path = Path(cache_dir) / f"{split}_{digest[:20]}.pt"
    if path.is_file():
        try:
            stored = read_weights_file(path)  # tensors and plain containers only
            if stored.get("key") == key:
                log(f"[features] {split}: cache hit {path}")
                return FeatureSet(**stored["features"]), True
        except Exception as exc:  # a truncated or foreign file: recompute rather than fail
            log(f"[features] {split}: unreadable cache file {path} ({exc}); recomputing")
    log(f"[features] {split}: extracting {len(dataset)} images -> {path}")
    features = extract_features(model, dataset, transform, n_last_blocks=n_last_blocks, batch_size=batch_size,
                                num_workers=num_workers, device=device, precision=precision, progress=progress,
                                desc=f"features {split}")
    if features.skipped:
        log(f"[features] {split}: {len(features.skipped)} unreadable image(s) left out, e.g. {features.skipped[:3]}")
    write_tensor_file(path, dict(key=key, features=features.to_dict()))
    return features, False
