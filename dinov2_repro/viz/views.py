"""The two views end to end: backbones + images -> PNG grids and a JSON summary.

``attention.png``: one row per image; the input, then for each backbone the mean CLS attention over heads with
the mass mask outlined. ``attention_heads_<k>.png``: every head of backbone k. ``pca.png``: the input, then each
backbone's PCA colours. ``viz.json``: per image and backbone, the peak patch, the mask size and the registers'
share of the CLS attention.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .attention import cls_attention, mass_mask
from .inputs import ViewTransform, VizImage, prepare
from .pca import patch_tokens, pca_rgb, pca_rgb_each
from .plots import Cell, save_grid, to_hwc, upsampled


@dataclass
class Backbone:
    """name: its label in figures; model: a `DinoVisionTransformer` in eval mode; info: from `load_backbone`."""

    name: str
    model: Any
    info: Dict[str, Any]


def backbone_label(spec: str) -> str:
    """A short figure label for a SPEC: the last path part, or ARCH/PATCH of ``random:ARCH/PATCH,options``."""
    random = spec.startswith("random:")
    rest = spec[len("random:"):] if random else spec
    path = Path(rest.rstrip("/")).expanduser()
    name = path.name if path.exists() else rest.split(",")[0]
    return ("random:" if random else "") + (name or rest)


def load_backbones(specs: Sequence[str], compare_random: bool = False, device: str = "cpu") -> List[Backbone]:
    """The SPECs in order, each followed by its random twin (same architecture) when ``compare_random``."""
    from ..eval.backbone_spec import load_backbone

    wanted: List[str] = []
    for spec in specs:
        wanted.append(spec)
        if compare_random and not spec.startswith("random:"):
            wanted.append(f"random:{spec}")
    backbones: List[Backbone] = []
    for spec in dict.fromkeys(wanted):  # once each, in order
        model, info = load_backbone(spec, device)
        label = backbone_label(spec)
        if any(b.name == label for b in backbones):  # labels key the summary: keep them apart
            label = f"{label}#{len(backbones)}"
        backbones.append(Backbone(label, model, info))
    return backbones


def view_transform(backbone: Backbone, size: int = 0, square: bool = False) -> ViewTransform:
    """The backbone's own normalisation and patch size; ``size`` 0: its evaluation size."""
    info = backbone.info
    return ViewTransform(size or int(info.get("eval_img_size") or 224), int(backbone.model.patch_size),
                         info["mean"], info["std"], square)


def file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "backbone"


def normalised(heat: torch.Tensor) -> torch.Tensor:
    """A map scaled to [0, 1] by its maximum (display only)."""
    return heat / heat.max().clamp_min(1e-12)


def attention_for(backbone: Backbone, images: Sequence[VizImage], *, size: int, block: int, mass: float,
                  square: bool) -> List[Dict[str, Any]]:
    """Per image: shown (3, h, w) uint8, heads (heads, h', w') maps, mean (h', w'), mask (h', w'), and stats."""
    device = next(backbone.model.parameters()).device
    results = []
    for shown, model_input in prepare(images, view_transform(backbone, size, square)):
        att = cls_attention(backbone.model, model_input.to(device), block)
        mean = att.mean[0].cpu()
        mask = mass_mask(mean, mass)
        peak = int(mean.flatten().argmax())
        results.append(dict(shown=shown, heads=att.patches[0].cpu(), mean=mean, mask=mask, stats=dict(
            grid=list(mean.shape), peak=[peak // mean.shape[1], peak % mean.shape[1]],
            mask_patches=int(mask.sum()), register_share=float(att.register_share()[0]),
            cls_self=float(att.cls[0].mean()), registers=int(att.registers.shape[-1]))))
    return results


def attention_cell(result: Dict[str, Any], with_registers: bool) -> Cell:
    """The mean map over the image, the mask outlined, the peak (and the registers' share) in the caption."""
    shown = result["shown"]
    text = f"peak {tuple(result['stats']['peak'])}"
    if with_registers:
        text += f", registers {result['stats']['register_share']:.0%}"
    return Cell(image=to_hwc(shown), heat=upsampled(normalised(result["mean"]), shown.shape[-2:]),
                mask=upsampled(result["mask"], shown.shape[-2:]) > 0.5, text=text)


def write_head_grids(backbones: Sequence[Backbone], per_backbone: Sequence[List[Dict[str, Any]]],
                     images: Sequence[VizImage], out_dir: Path, block: int) -> Dict[str, str]:
    """One grid per backbone: rows = images, columns = heads. Returns {"heads_<k>": file name}."""
    files = {}
    for k, (backbone, results) in enumerate(zip(backbones, per_backbone)):
        name = f"attention_heads_{k}_{file_stem(backbone.name)}.png"
        rows = [[Cell(image=to_hwc(r["shown"]), heat=upsampled(normalised(h), r["shown"].shape[-2:]))
                 for h in r["heads"]] for r in results]
        save_grid(rows, out_dir / name, [f"head {h}" for h in range(len(results[0]["heads"]))],
                  [im.name for im in images], title=f"{backbone.name}\nCLS attention per head, block {block}")
        files[f"heads_{k}"] = name
    return files


def write_attention(backbones: Sequence[Backbone], images: Sequence[VizImage], out_dir: os.PathLike, *,
                    size: int = 0, block: int = -1, mass: float = 0.6, square: bool = False,
                    heads: bool = True) -> Dict[str, Any]:
    """Attention grids for ``images`` under ``out_dir``; returns the summary written to ``attention.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_backbone = [attention_for(b, images, size=size, block=block, mass=mass, square=square) for b in backbones]
    rows = []
    for i in range(len(images)):
        first = per_backbone[0][i]["shown"]
        rows.append([Cell(image=to_hwc(first))] + [attention_cell(results[i], b.model.num_register_tokens > 0)
                                                   for b, results in zip(backbones, per_backbone)])
    columns = ["input"] + [f"{b.name}\nblock {block}, mask {mass:.0%}" for b in backbones]
    files = {"attention": "attention.png"}
    save_grid(rows, out_dir / files["attention"], columns, [im.name for im in images],
              title="CLS attention, mean over heads\n(outline: fewest patches holding the mass)")
    if heads:
        files.update(write_head_grids(backbones, per_backbone, images, out_dir, block))
    summary = dict(view="attention", block=block, mass=mass, files=files,
                   backbones=[dict(name=b.name, spec=b.info.get("spec"), num_register_tokens=int(
                       b.model.num_register_tokens)) for b in backbones],
                   images=[dict(name=im.name, source=im.source, **{b.name: r[i]["stats"] for b, r in
                                                                   zip(backbones, per_backbone)})
                           for i, im in enumerate(images)])
    return summary


def write_pca(backbones: Sequence[Backbone], images: Sequence[VizImage], out_dir: os.PathLike, *, size: int = 0,
              threshold: float = 0.0, joint: bool = True, square: bool = False) -> Dict[str, Any]:
    """PCA grid for ``images`` under ``out_dir`` (jointly over the set unless ``joint`` is False)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown_of, views = [], []
    for backbone in backbones:
        device = next(backbone.model.parameters()).device
        pairs = prepare(images, view_transform(backbone, size, square))
        tokens = [patch_tokens(backbone.model, x.to(device))[0].cpu() for _, x in pairs]
        views.append(pca_rgb(tokens, threshold) if joint else pca_rgb_each(tokens, threshold))
        shown_of.append([shown for shown, _ in pairs])
    rows = []
    for i in range(len(images)):
        row = [Cell(image=to_hwc(shown_of[0][i]))]
        for shown, view in zip(shown_of, views):
            rgb = upsampled(view.rgb[i].permute(2, 0, 1), shown[i].shape[-2:]).transpose(1, 2, 0)
            row.append(Cell(image=rgb, text=f"foreground {float(view.foreground[i].float().mean()):.0%}"))
        rows.append(row)
    scope = "jointly over the images" if joint else "per image"
    save_grid(rows, out_dir / "pca.png", ["input"] + [b.name for b in backbones], [im.name for im in images],
              title=f"PCA of patch features, {scope}\n(components 1-3 as RGB, background black)")
    return dict(view="pca", joint=joint, threshold=threshold, files={"pca": "pca.png"},
                backbones=[dict(name=b.name, spec=b.info.get("spec")) for b in backbones],
                images=[dict(name=im.name, source=im.source, **{b.name: dict(
                    grid=list(v.rgb[i].shape[:2]), foreground=float(v.foreground[i].float().mean()))
                    for b, v in zip(backbones, views)}) for i, im in enumerate(images)])


def visualize(view: str, specs: Sequence[str], images: Sequence[os.PathLike | str], out_dir: os.PathLike | str = "viz",
              *, compare_random: bool = False, device: str = "auto", max_images: int = 8, slices_per_volume: int = 3,
              **options: Any) -> Dict[str, Any]:
    """``dinov2-repro viz VIEW``: ``view`` attention | pca, ``specs`` backbone SPECs, ``images`` files, folders or
    volumes. ``options`` go to `write_attention` (size, block, mass, square, heads) or `write_pca` (size, threshold,
    joint, square). Writes the PNGs and ``<view>.json`` under ``out_dir``; returns that summary (``skipped``: the
    samples that could not be decoded)."""
    from ..eval.backbone_spec import environment_device
    from .inputs import collect_images

    if view not in ("attention", "pca"):
        raise ValueError(f"view {view!r} is not one of attention, pca")
    if isinstance(specs, (str, os.PathLike)):
        specs = [str(specs)]
    shown, skipped = collect_images(images, max_images, slices_per_volume)  # bad input fails before loading
    backbones = load_backbones([str(s) for s in specs], compare_random, environment_device(device))
    writer = write_attention if view == "attention" else write_pca
    summary = writer(backbones, shown, out_dir, **options)
    summary["skipped"] = skipped
    Path(out_dir, f"{view}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
