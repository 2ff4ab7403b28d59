"""Trained classifiers in a loadable form, and their predictions on new images.

Two kinds are written by the evaluation commands:

- ``eval finetune`` -> ``runs/<fraction>_<seed>/best.pth``: the fine-tuned backbone (hub layout), its linear head,
  the architecture, the preprocessing and the class names;
- ``eval linear`` -> ``classifier.pth``: the validation-selected linear head of the main run, the features it reads
  (last n CLS tokens, optionally the mean patch token), the class names, the preprocessing, and the backbone's SPEC
  with the SHA-1 of its weights (checked when the classifier is loaded: a backbone file that changed is an error).

`load_classifier(path)` gives either as a `Classifier` whose `predict(dataset)` returns per-image class
probabilities, skipping (and naming) unreadable images.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

from torch import Tensor

CLASSIFIER_FILE = "classifier.pth"


class ClassifierError(ValueError):
    """A classifier file that cannot be used; the message names the file and why."""


def save_linear_classifier(path: os.PathLike, probe, choice_index: int, lr_index: int, info: Dict[str, Any],
                           classes: Sequence[str], preprocessing: Dict[str, Any]) -> Path:
    """The selected head of a `linear.LinearProbe` (weight (D, C), bias (C,)) with what rebuilds its input."""
    from ..models.weights import write_tensor_file

    head, choice = probe.heads[choice_index], probe.choices[choice_index]
    payload = dict(kind="linear", weight=head.weight[lr_index].detach().cpu().clone(),
                   bias=head.bias[lr_index, 0].detach().cpu().clone(), n_blocks=int(choice.n_blocks),
                   avgpool=bool(choice.avgpool), classes=list(classes), backbone_spec=str(info.get("spec")),
                   weights_sha1=str(info.get("weights_sha1")), preprocessing=dict(preprocessing))
    write_tensor_file(Path(path), payload)
    return Path(path)


@dataclasses.dataclass
class Predictions:
    paths: List[str]
    probs: Tensor  # (N, C)
    classes: List[str]
    skipped: List[str]  # unreadable images, left out


class Classifier:
    """A loaded classifier: ``predict(dataset, device, batch_size)`` -> `Predictions`."""

    def __init__(self, payload: Dict[str, Any], source: str):
        self.payload, self.source = payload, source
        self.classes = [str(c) for c in payload.get("classes") or []]
        if not self.classes:
            raise ClassifierError(f"{source}: holds no class names (written by an older version: re-run the "
                                  f"evaluation to get a loadable classifier)")
        prep = payload.get("preprocessing") or {}
        missing = [k for k in ("crop_size", "resize_size", "mean", "std") if k not in prep]
        if missing:
            raise ClassifierError(f"{source}: preprocessing lacks {missing}")
        self.preprocessing = prep

    def transform(self):
        from .features import EvalTransform

        p = self.preprocessing
        return EvalTransform(int(p["resize_size"]), int(p["crop_size"]), p["mean"], p["std"])

    def predict(self, dataset, device: Any = "cpu", batch_size: int = 64, num_workers: int = 0,
                progress: bool = False) -> Predictions:
        if self.payload["kind"] == "linear":
            return self._predict_linear(dataset, device, batch_size, num_workers, progress)
        return self._predict_finetuned(dataset, device, batch_size, num_workers, progress)

    def _predict_linear(self, dataset, device, batch_size: int, num_workers: int, progress: bool) -> Predictions:
        from .backbone_spec import load_backbone
        from .features import extract_features

        p = self.payload
        model, info = load_backbone(p["backbone_spec"], device)
        if info.get("weights_sha1") != p["weights_sha1"]:
            raise ClassifierError(f"{self.source}: the backbone {p['backbone_spec']!r} is not the one this head was "
                                  f"trained on (weights SHA-1 {str(info.get('weights_sha1'))[:12]}, expected "
                                  f"{str(p['weights_sha1'])[:12]})")
        features = extract_features(model, dataset, self.transform(), n_last_blocks=int(p["n_blocks"]),
                                    batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                                    desc="predict")
        x = features.linear_input(int(p["n_blocks"]), bool(p["avgpool"])).float()
        probs = (x @ p["weight"].float() + p["bias"].float()).softmax(-1)
        return Predictions(list(features.paths), probs, self.classes, list(features.skipped))

    def _predict_finetuned(self, dataset, device, batch_size: int, num_workers: int, progress: bool) -> Predictions:
        from ..models.weights import build_model, load_strict
        from .finetune import FinetuneClassifier, image_loader, predict

        p = self.payload
        backbone = build_model(p["arch"])
        load_strict(backbone, p["backbone"], f"{self.source} (backbone)")
        model = FinetuneClassifier(backbone, int(p["n_classes"]), int(backbone.embed_dim), str(p["head_input"]))
        model.head.load_state_dict(p["head"])
        model = model.to(device).eval()
        loader = image_loader(dataset, self.transform(), batch_size, False, num_workers, 0, device)
        if progress:
            from tqdm import tqdm

            loader = tqdm(loader, desc="predict", unit="batch")
        probs, _, kept, failed = predict(model, loader, device, "fp32")
        return Predictions([dataset.samples[i][0] for i in kept], probs.float().cpu(), self.classes,
                           [dataset.samples[i][0] for i in failed])


def load_classifier(path: os.PathLike) -> Classifier:
    """A ``classifier.pth`` from ``eval linear`` or a ``best.pth`` from ``eval finetune`` (or their folder)."""
    from ..models.weights import WeightsError, read_weights_file

    path = Path(path)
    if not path.exists():
        raise ClassifierError(f"{path}: no such file or folder (give the classifier.pth of `eval linear`, the "
                              f"best.pth of `eval finetune`, or their output folder)")
    if path.is_dir():
        found = sorted(path.glob(CLASSIFIER_FILE)) or sorted(path.glob("runs/*/best.pth"))
        if not found:
            raise ClassifierError(f"{path}: no {CLASSIFIER_FILE} (eval linear) or runs/*/best.pth (eval finetune)")
        path = found[0]
    try:
        payload = read_weights_file(path)
    except WeightsError as exc:
        raise ClassifierError(str(exc)) from exc
    if not isinstance(payload, dict):
        raise ClassifierError(f"{path}: not a classifier file")
    if "kind" not in payload and "head" in payload and "backbone" in payload:
        payload = dict(payload, kind="finetune")
    if payload.get("kind") not in ("linear", "finetune"):
        raise ClassifierError(f"{path}: not a classifier written by `eval linear` or `eval finetune`")
    return Classifier(payload, str(path))
