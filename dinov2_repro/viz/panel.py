"""The attention panel of an evaluation report: the backbone's CLS attention on a few test images per class, one
classified correctly and one wrongly where there is one, chosen deterministically (first by path).

Cheap on purpose (at most ``per_class`` x 2 images per class, 12 in all, one forward pass each), and never fatal:
`safe_attention_panel` turns any failure into a warning in the evaluation log. For fine-tuning, the attention shown
is the backbone's before fine-tuning (the evaluated backbone, not the fine-tuned copy).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

PANEL_FILE = "attention_panel.png"
MAX_IMAGES = 12


def pick_panel_images(predictions: Dict[str, list], n_classes: int, per_class: int = 1,
                      most: int = MAX_IMAGES) -> List[Tuple[str, int, int]]:
    """(path, label, predicted) of the first ``per_class`` correct and wrong test images of each class, by path."""
    rows = sorted(zip(predictions["paths"], predictions["labels"], predictions["predicted"]))
    picked: List[Tuple[str, int, int]] = []
    for label in range(n_classes):
        for correct in (True, False):
            chosen = [r for r in rows if r[1] == label and (r[1] == r[2]) == correct][:per_class]
            picked += chosen
    return picked[:most]


def attention_panel(model, info: Dict[str, Any], dataset, predictions: Dict[str, list], classes: Sequence[str],
                    output_dir: os.PathLike, crop_size: int, mean: Sequence[float], std: Sequence[float],
                    resize_size: int = 0, per_class: int = 1) -> Optional[str]:
    """Write ``attention_panel.png`` under ``output_dir``; returns its name, or None when there is nothing to show.

    ``dataset`` decodes the test images (its ``samples`` hold the prediction paths); the images are preprocessed as
    the evaluation saw them (``resize_size``, ``crop_size``, ``mean``, ``std``: `eval.features.EvalTransform`).
    """
    from .attention import cls_attention, mass_mask
    from .inputs import ViewTransform
    from .plots import Cell, save_grid, to_hwc, upsampled

    index_of = {path: i for i, (path, _) in enumerate(dataset.samples)}
    transform = ViewTransform(crop_size, int(model.patch_size), mean, std, square=True, resize=resize_size)
    device = next(model.parameters()).device
    rows, names = [], []
    for path, label, predicted in pick_panel_images(predictions, len(classes), per_class):
        pixels = dataset.load_image(index_of[path]) if path in index_of else None
        if pixels is None:
            continue
        shown, model_input = transform(pixels)
        mean_map = cls_attention(model, model_input.unsqueeze(0).to(device)).mean[0].cpu()
        verdict = "correct" if label == predicted else f"predicted {classes[predicted]}"
        rows.append([Cell(image=to_hwc(shown)),
                     Cell(image=to_hwc(shown), heat=upsampled(mean_map / mean_map.max(), shown.shape[-2:]),
                          mask=upsampled(mass_mask(mean_map), shown.shape[-2:]) > 0.5,
                          text=f"{classes[label]}: {verdict}")])
        names.append(f"{Path(path).parent.name}/{Path(path).name}")  # file names repeat across class folders
    if not rows:
        return None
    spec = str(info.get("spec", ""))
    save_grid(rows, Path(output_dir) / PANEL_FILE, ["test image", "CLS attention (last block)"], names,
              title=spec if len(spec) <= 40 else "..." + spec[-37:])
    return PANEL_FILE


def safe_attention_panel(*args, log: Callable[[str], None] = print, **kwargs) -> Optional[str]:
    """`attention_panel`, with any failure logged as a warning instead of raised (the panel is an extra)."""
    try:
        return attention_panel(*args, **kwargs)
    except Exception as exc:  # a backbone without blocks, an unreadable image, a plotting problem: warn, go on
        log(f"[report] WARNING: no attention panel ({type(exc).__name__}: {exc})")
        return None
