"""Are two augmented views of one image closer than views of two images, for a freshly initialised teacher?

DINO's [CLS] term can only start learning when its teacher's targets for view 1 say something about view 2 of the
same image. This measures that at initialisation, per real-image set of `benchmarks/learning.py`: the cosine of the
teacher's final CLS token between the two global views of one image (``same``) and of different images
(``diff``), their normalised gap ``margin = (same - diff) / (1 - diff)``, and how often view 1 finds its own view 2
among all view 2s (``top1``). No training; about 10 s per row on 2 CPU cores.

    python benchmarks/view_consistency.py --sets digits,textures,photos
    python benchmarks/view_consistency.py --sets digits "crops.global_crops_scale=[0.6,1.0]" --no-solarize
    python benchmarks/view_consistency.py --data path/to/your/images --preset vits14_brain_mri student.layerscale=1.0

Results and what they predicted are in docs/small_scale.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.learning import build_set, set_overrides  # noqa: E402


def measure(cfg, images, n_images: int, solarize: bool) -> Dict[str, float]:
    """The view-consistency figures of config ``cfg`` (its model, crops and augmentation) on up to ``n_images``
    images of ``images`` (a dataset with ``load_image``; unreadable images, which give None, are skipped)."""
    from omegaconf import OmegaConf

    import dinov2_repro.data.augmentations as augmentations
    from dinov2_repro.train.meta_arch import SSLMetaArch

    torch.manual_seed(0)
    teacher = SSLMetaArch(cfg).teacher["backbone"].eval()
    # the training pipeline's own augmentation, global views only
    aug = augmentations.build_multicrop_augmentation(OmegaConf.merge(cfg, {"crops": {"local_crops_number": 0}}))
    g = torch.Generator().manual_seed(1)
    views = ([], [])
    saved = augmentations.SOLARIZE_P
    augmentations.SOLARIZE_P = saved if solarize else 0.0  # a module constant: restored below
    try:
        for index in torch.randperm(len(images), generator=g).tolist():
            image = images.load_image(index)
            if image is None:
                continue
            crops = aug(image, generator=g)["global_crops"]
            views[0].append(crops[0])
            views[1].append(crops[1])
            if len(views[0]) == n_images:
                break
    finally:
        augmentations.SOLARIZE_P = saved
    if len(views[0]) < 2:
        raise SystemExit(f"view consistency needs at least 2 readable images, found {len(views[0])}")
    with torch.no_grad():
        cls = [F.normalize(teacher(torch.stack(v), is_training=True)["x_norm_clstoken"], dim=-1) for v in views]
    sim = cls[0] @ cls[1].T
    n = sim.shape[0]
    same, diff = sim.diag().mean().item(), (sim.sum() - sim.diag().sum()).item() / (n * n - n)
    top1 = (sim.argmax(1) == torch.arange(n)).float().mean().item()
    if 1 - diff < 1e-6:  # e.g. LayerScale 1e-5: every image's CLS token starts the same, so views cannot differ
        raise SystemExit(f"the fresh teacher gives every image the same CLS token (cosine {diff:.6f}; "
                         f"student.layerscale={cfg.student.layerscale:g}): add student.layerscale=1.0 to compare views")
    return dict(same=same, diff=diff, margin=(same - diff) / (1 - diff), top1=top1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="digits,textures,photos", help="this benchmark's real-image sets")
    parser.add_argument("--data", default="", help="measure your own images instead: any data.path that `train` "
                        "reads (a folder, CSV, NIfTI/DICOM tree); data.kind, data.augmentation, data.mean/std as "
                        "overrides. Worth a look before a long run: a margin near 0 says two views of one image "
                        "are no closer than two images")
    parser.add_argument("--preset", default="demo_cpu", help="the train preset whose model and crops are measured")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--no-solarize", action="store_true", help="drop the second global view's solarize")
    parser.add_argument("--out", default=str(ROOT / "benchmark_runs" / "learning"), help="where the sets are cached")
    parser.add_argument("overrides", nargs="*",
                        help="pretraining-config overrides, e.g. crops.global_crops_scale=[0.6,1.0]")
    args = parser.parse_args(argv)
    from dinov2_repro.config import configs_dir, load_config
    from dinov2_repro.data.datasets import open_labeled_dataset
    from dinov2_repro.data.loaders import build_pretraining_images

    torch.set_num_threads(1)
    preset = configs_dir() / "train" / f"{args.preset}.yaml"
    views = " ".join(args.overrides) + (" no solarize" if args.no_solarize else "")
    print("| set | views | CLS cosine, same image | different images | margin | top-1 |")
    print("|---|---|---|---|---|---|")
    for set_name in [args.data] if args.data else args.sets.split(","):
        if args.data:
            # the folder is read as `train` reads it; the preset's own data keys (a synthetic set) do not apply
            cfg = load_config(preset, [f"data.path={args.data}", "data.kind=auto", "data.split=", *args.overrides])
            images = build_pretraining_images(cfg)
        else:
            data = build_set(set_name, Path(args.out) / "sets")
            cfg = load_config(preset, [*set_overrides(set_name, data), *args.overrides])
            images = open_labeled_dataset(data, "Training")
        r = measure(cfg, images, args.images, not args.no_solarize)
        print(f"| {set_name} | {views.strip() or 'preset'} | {r['same']:.3f} | {r['diff']:.3f} | {r['margin']:.2f} | "
              f"{100 * r['top1']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
