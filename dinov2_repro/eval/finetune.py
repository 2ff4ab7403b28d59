"""Full fine-tuning of a backbone with a linear classification head.

Recipe (the `finetune.yaml` default; BEiT, Bao et al. 2021, arXiv 2106.08254, for the layer-wise decay):
AdamW, peak lr scaled by batch / 256, layer-wise lr decay (multiplier decay^(L+1-layer): embeddings are layer 0,
block i layer i+1, final norm and head layer L+1), linear warmup then cosine to ``min_lr`` (per iteration), label
smoothing, stochastic depth, gradient clipping, bf16 autocast on CUDA. Training images: random resized crop (or a
plain resize) to ``crop_size``, horizontal flip, light brightness/contrast jitter; evaluation images: resize the
shorter side to ``resize_size``, centre crop ``crop_size``. After every epoch the model is scored on the validation
split; the best one (accuracy, ties: lower loss) is kept (and checkpointed), training stops after ``patience``
epochs without improvement, and only the best model is scored on the test split.

`finetune_reference.yaml` reproduces the report we start from instead: Adam, constant lr 1e-6, 5 epochs, resize
224 + flip, plain cross-entropy (94.92% on Kaggle).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.datasets import loader_workers
from .features import EvalTransform, IndexedImages, autocast_context, collate_indexed


class TrainTransform:
    """uint8 (3, H, W) -> float (3, crop, crop) with the fine-tuning augmentations (see module docstring)."""

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float], mode: str = "random_resized",
                 rrc_scale: Sequence[float] = (0.5, 1.0), hflip: bool = True, intensity_jitter: float = 0.0):
        self.crop_size, self.mode = int(crop_size), mode
        self.rrc_scale = (float(rrc_scale[0]), float(rrc_scale[1]))
        self.hflip, self.intensity_jitter = bool(hflip), float(intensity_jitter)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as TF

        size = [self.crop_size, self.crop_size]
        if self.mode == "random_resized":
            top, left, h, w = v2.RandomResizedCrop.get_params(image, scale=list(self.rrc_scale),
                                                              ratio=[3 / 4, 4 / 3])
            image = TF.resized_crop(image, top, left, h, w, size, interpolation=v2.InterpolationMode.BICUBIC,
                                    antialias=True)
        else:
            image = TF.resize(image, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and torch.rand(()) < 0.5:
            image = TF.horizontal_flip(image)
        image = image.float().div_(255.0)
        if self.intensity_jitter > 0:
            # MRI intensities: brightness (gain) and contrast around the image mean; no hue/saturation
            j = self.intensity_jitter
            brightness, contrast = (1 + (torch.rand(2) * 2 - 1) * j).tolist()
            image = image * brightness
            mean = image.mean()
            image = ((image - mean) * contrast + mean).clamp_(0.0, 1.0)
        return TF.normalize(image, self.mean, self.std)

    def describe(self) -> Dict[str, Any]:
        return dict(kind="train", crop_size=self.crop_size, mode=self.mode, rrc_scale=list(self.rrc_scale),
                    hflip=self.hflip, intensity_jitter=self.intensity_jitter, mean=self.mean, std=self.std)


class FinetuneClassifier(nn.Module):
    """Backbone + linear head on the CLS token (optionally concatenated with the mean patch token)."""

    def __init__(self, backbone: nn.Module, n_classes: int, embed_dim: int, head_input: str = "cls"):
        super().__init__()
        self.backbone = backbone.requires_grad_(True)  # full fine-tuning: every backbone weight trains
        self.use_avgpool = head_input == "cls_avgpool" and hasattr(backbone, "forward_features")
        self.head = nn.Linear(embed_dim * (2 if self.use_avgpool else 1), n_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        if hasattr(self.backbone, "forward_features"):
            out = self.backbone.forward_features(images)
            features = out["x_norm_clstoken"]  # (B, D)
            if self.use_avgpool:
                features = torch.cat([features, out["x_norm_patchtokens"].mean(1)], dim=1)  # (B, 2D)
        else:
            features = self.backbone(images)
        return self.head(features)


def _set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Stochastic depth for fine-tuning, linearly increasing with depth (the usual fine-tuning rule)."""
    from ..layers.drop_path import DropPath

    blocks = list(getattr(backbone, "blocks", []))
    for i, block in enumerate(blocks):
        block_rate = rate * i / max(len(blocks) - 1, 1)
        if hasattr(block, "drop_path1"):
            block.drop_path1 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(block_rate) if block_rate > 0 else nn.Identity()
            block.sample_drop_ratio = block_rate


def build_param_groups(model: FinetuneClassifier, layer_decay: float) -> List[Dict[str, Any]]:
    """Optimizer groups with lr_multiplier (layer-wise decay) and wd_multiplier (0 for biases, norms, gammas)."""
    from ..train.param_groups import fuse_params_groups, get_params_groups_with_decay

    groups = get_params_groups_with_decay(model.backbone, layerwise_decay=layer_decay, patch_embed_lr_mult=1.0,
                                          prefix="backbone.")
    groups += get_params_groups_with_decay(model.head, is_backbone=False, prefix="head.")
    return fuse_params_groups(groups)


def image_loader(dataset, transform, batch_size: int, shuffle: bool, num_workers: int, seed: int, device):
    return torch.utils.data.DataLoader(
        IndexedImages(dataset, transform), batch_size=batch_size, shuffle=shuffle, drop_last=False,
        num_workers=loader_workers(num_workers, len(dataset), batch_size), collate_fn=collate_indexed,
        pin_memory=torch.device(device).type == "cuda", generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def predict(model: nn.Module, loader, device, precision: str) -> Tuple[Tensor, Tensor, List[int], List[int]]:
    """(probabilities (N, C), labels (N,), kept dataset indices, unreadable dataset indices)."""
    model.eval()
    probs, labels, kept, failed = [], [], [], []
    for index, images, targets, bad, _ in loader:
        failed.extend(bad)
        if index is None:
            continue
        with autocast_context(device, precision):
            logits = model(images.to(device, non_blocking=True))
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(targets)
        kept.extend(index.tolist())
    return torch.cat(probs), torch.cat(labels), kept, failed


def _score(probs: Tensor, labels: Tensor) -> Tuple[float, float]:
    accuracy = float((probs.argmax(1) == labels).float().mean())
    loss = float(F.nll_loss(probs.clamp_min(1e-12).log(), labels))
    return accuracy, loss


def run_finetune(backbone: nn.Module, info: Dict[str, Any], train_set, val_set, n_classes: int, cfg, *,
                 crop_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0, device: Any = "cpu", batch_size_eval: int = 64, num_workers: int = 0,
                 checkpoint_path: Optional[Path] = None, progress: bool = False,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fine-tune a copy of ``backbone`` on ``train_set``; early-stop on ``val_set``. ``cfg`` = the ``finetune``
    section. Returns dict(model (best, eval mode), eval_transform, curves, best_epoch, val_accuracy, ...)."""
    from ..train.schedules import warmup_cosine

    device = torch.device(device)
    torch.manual_seed(seed)
    backbone = copy.deepcopy(backbone).cpu()  # the caller's (frozen) backbone stays as it is
    _set_drop_path(backbone, float(cfg.drop_path_rate))
    embed_dim = int(info.get("embed_dim") or getattr(backbone, "embed_dim"))
    model = FinetuneClassifier(backbone, n_classes, embed_dim, cfg.head_input).to(device)

    train_tf = TrainTransform(crop_size, mean, std, cfg.train_crop, cfg.rrc_scale, cfg.hflip, cfg.intensity_jitter)
    eval_tf = EvalTransform(resize_size, crop_size, mean, std)
    batch_size = min(int(cfg.batch_size), len(train_set))
    train_loader = image_loader(train_set, train_tf, batch_size, True, num_workers, seed, device)
    val_loader = image_loader(val_set, eval_tf, batch_size_eval, False, num_workers, seed, device)

    from .linear import scaled_lr

    peak_lr = scaled_lr(float(cfg.lr), int(cfg.batch_size), cfg.lr_scaling)
    groups = build_param_groups(model, float(cfg.layer_decay))
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    weight_decay = float(cfg.weight_decay) if cfg.optimizer == "adamw" else 0.0
    optimizer = optimizer_cls([dict(g, lr=0.0, weight_decay=0.0) for g in groups], lr=0.0)
    steps_per_epoch = len(train_loader)
    total_steps = int(cfg.epochs) * steps_per_epoch
    warmup_epochs = min(float(cfg.warmup_epochs), 0.5 * int(cfg.epochs))  # a short run still decays: at most half
    if warmup_epochs < float(cfg.warmup_epochs):
        log(f"[finetune] finetune.warmup_epochs={cfg.warmup_epochs:g} does not fit {cfg.epochs} epoch(s): warming "
            f"up for {warmup_epochs:g} (half the run)")
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if cfg.schedule == "constant":
            return peak_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else peak_lr
        return warmup_cosine(step, peak_lr, float(cfg.min_lr), total_steps, warmup_iters=warmup_steps)

    curves: Dict[str, List[float]] = dict(epoch=[], train_loss=[], train_accuracy=[], val_loss=[],
                                          val_accuracy=[], lr=[])
    best = dict(epoch=-1, accuracy=-1.0, loss=math.inf, state=None)
    n_skipped, step, stale = 0, 0, 0
    start = time.perf_counter()
    for epoch in range(int(cfg.epochs)):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = train_loader
        if progress:
            from tqdm import tqdm

            batches = tqdm(train_loader, desc=f"fine-tune epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for index, images, labels, bad, _ in batches:
            n_skipped += len(bad)
            if index is None:
                continue
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_multiplier"]
                group["weight_decay"] = weight_decay * group["wd_multiplier"]
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast_context(device, cfg.precision):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=float(cfg.label_smoothing))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         f"lower finetune.lr (now {peak_lr:g} after scaling)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.clip_grad))
            optimizer.step()
            step += 1
            loss_sum += loss.item() * labels.shape[0]
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.shape[0]
        val_probs, val_labels, _, _ = predict(model, val_loader, device, cfg.precision)
        val_acc, val_loss = _score(val_probs, val_labels)
        curves["epoch"].append(epoch + 1)
        curves["train_loss"].append(loss_sum / max(seen, 1))
        curves["train_accuracy"].append(correct / max(seen, 1))
        curves["val_loss"].append(val_loss)
        curves["val_accuracy"].append(val_acc)
        curves["lr"].append(lr_at(max(step - 1, 0)))
        # better accuracy, or the same accuracy with a clearly lower loss (rounding noise is no improvement)
        improved = val_acc > best["accuracy"] or (val_acc == best["accuracy"] and
                                                  val_loss < best["loss"] - 1e-4 * abs(best["loss"]))
        log(f"[finetune] epoch {epoch + 1}/{cfg.epochs}: train loss {curves['train_loss'][-1]:.4f} "
            f"acc {curves['train_accuracy'][-1]:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
            f"{'  (best)' if improved else ''}")
        if improved:
            best.update(epoch=epoch + 1, accuracy=val_acc, loss=val_loss,
                        state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            stale = 0
            if checkpoint_path is not None and cfg.save_best:
                _save_best(checkpoint_path, info, n_classes, cfg.head_input, best,
                           dict(crop_size=crop_size, resize_size=resize_size, mean=list(mean), std=list(std)),
                           list(getattr(train_set, "classes", [])))
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                log(f"[finetune] early stop after epoch {epoch + 1}: no val improvement for {stale} epochs")
                break
    model.load_state_dict(best["state"])
    model.eval()
    return dict(model=model, eval_transform=eval_tf, train_transform=train_tf.describe(), curves=curves,
                best_epoch=best["epoch"], val_accuracy=best["accuracy"], val_loss=best["loss"],
                epochs_run=len(curves["epoch"]), peak_lr=peak_lr, steps=step, n_skipped_train=n_skipped,
                seconds=time.perf_counter() - start,
                checkpoint=str(checkpoint_path) if checkpoint_path is not None and cfg.save_best else None)


def _save_best(path: Path, info: Dict[str, Any], n_classes: int, head_input: str, best: Dict[str, Any],
               preprocessing: Dict[str, Any], classes: List[str]) -> None:
    """The best-on-val model: backbone in hub layout (loadable as a SPEC), head, and what is needed to rebuild it."""
    from ..models.weights import write_tensor_file

    arch_keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                 "proj_bias", "ffn_bias", "ffn_layer", "init_values", "num_register_tokens",
                 "interpolate_offset", "interpolate_antialias")
    payload = dict(
        backbone={k[len("backbone."):]: v for k, v in best["state"].items() if k.startswith("backbone.")},
        head={k[len("head."):]: v for k, v in best["state"].items() if k.startswith("head.")},
        arch={k: info[k] for k in arch_keys if k in info}, n_classes=n_classes, head_input=head_input,
        epoch=best["epoch"], val_accuracy=best["accuracy"], preprocessing=preprocessing,
        source_spec=info.get("spec"), classes=classes, kind="finetune")
    write_tensor_file(path, payload)
