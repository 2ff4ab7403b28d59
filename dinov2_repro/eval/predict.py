"""``dinov2-repro predict``: apply a trained classifier to new images and write every class's probability.

    dinov2-repro predict --model runs/eval/linear_vits14 --data new_scans/ --output predictions.csv
    dinov2-repro predict --model runs/eval/finetune_vits14/runs/fraction1_seed0/best.pth --data scan.png

MODEL: the output folder of ``eval linear`` (its ``classifier.pth``) or of ``eval finetune`` (its first
``runs/*/best.pth``), or either file. DATA: one image, NIfTI volume or DICOM file, a folder (searched
recursively; images, volumes and DICOM series alike) or a CSV manifest with a ``path`` column. A volume gives one
row per kept slice. Unreadable images are skipped, counted and named; the input is never written to.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import List, Optional

from .classifier import ClassifierError, Predictions, load_classifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro predict", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", required=True, help="classifier.pth / best.pth, or the eval output folder")
    parser.add_argument("--data", required=True, metavar="IMAGE_DIR_OR_CSV",
                        help="the images to classify: an image, a NIfTI/DICOM volume (one row per slice), a folder "
                             "or a CSV manifest")
    parser.add_argument("--output", default=None, help="CSV to write (default <output-dir>/predictions.csv)")
    parser.add_argument("--output-dir", default=".", help="folder for predictions.csv when --output is not given")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    return parser


def open_images(data: str):
    """One image or volume, a folder (recursive; images, volumes and DICOM series alike) or a CSV manifest of any
    of those -> an `ImageFileDataset` (labels, if any, unused); a volume gives one row per kept slice
    (``<file>::<axis>=<index>``), read with the default volume settings."""
    from ..data.sources import open_unlabelled

    return open_unlabelled(data, "--data")


def write_predictions(path: Path, predictions: Predictions) -> None:
    """``path, predicted, p_<class>...`` per image, written atomically."""
    from .report import write_text

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *(f"p_{c}" for c in predictions.classes)])
    for image, probs in zip(predictions.paths, predictions.probs.tolist()):
        best = max(range(len(probs)), key=probs.__getitem__)
        writer.writerow([image, predictions.classes[best], *(f"{v:.6g}" for v in probs)])
    write_text(path, buffer.getvalue())


def predict(model: str, data: str, output: str = "predictions.csv", device: str = "auto", batch_size: int = 64,
            num_workers: int = 0, progress: bool = False) -> Predictions:
    """Classify ``data`` with the classifier at ``model``; writes ``output`` and returns the `Predictions`."""
    from .backbone_spec import environment_device

    classifier = load_classifier(model)
    dataset = open_images(data)
    result = classifier.predict(dataset, environment_device(device), batch_size, num_workers, progress)
    write_predictions(Path(output), result)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from ..models.weights import WeightsError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    output = args.output or str(Path(args.output_dir) / "predictions.csv")
    try:
        result = predict(args.model, args.data, output, args.device, args.batch_size, args.num_workers,
                         progress=not args.no_progress)
    except (ClassifierError, WeightsError, FileNotFoundError, ValueError) as exc:
        print(f"dinov2-repro predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result.paths)} images classified into {result.classes}; probabilities in {output}")
    if result.skipped:
        shown = ", ".join(result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else "")
        print(f"skipped {len(result.skipped)} unreadable image(s): {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
