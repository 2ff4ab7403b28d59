"""``dinov2-repro eval linear|knn|finetune``: evaluate a backbone on labelled images.

    dinov2-repro eval linear --backbone runs/vits14 --data data/brain_mri
    dinov2-repro eval knn --backbone dinov2_vits14_pretrain.pth --data data/brain_mri --train-fractions 1,0.25
    dinov2-repro eval finetune --backbone random:vit_small/14 --data manifest.csv --config configs/eval/finetune.yaml \
        finetune.epochs=10 data.num_workers=8

``key=value`` overrides address the eval config (`dinov2_repro/eval/config.py`, presets in ``configs/eval/``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional

MODES = ("linear", "knn", "finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-repro eval",
        description="Linear probe, k-NN or fine-tuning of a backbone on a labelled image dataset. The validation "
                    "split is held out of the training split and used for every choice; the test split is only "
                    "scored once, for the report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SPEC: a run directory, a checkpoint or exported .pth, a hub file (dinov2_vits14_pretrain.pth), a "
               "Hugging Face dinov2 folder, random:vit_small/14[,depth=..] or random:<run dir>.\n"
               "DATA: Kaggle layout (Training/ Testing/), a class folder (a test split is then held out), or a CSV "
               "manifest (path,label[,split]).")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--backbone", required=True, metavar="SPEC", help="what to evaluate (see below)")
    parser.add_argument("--data", required=True, metavar="DIR_OR_CSV", help="labelled images")
    parser.add_argument("--output-dir", default=None,
                        help="where metrics.json, report.md and figures go (default runs/eval/<mode>_<spec name>)")
    parser.add_argument("--config", default=None, help="eval preset YAML (default configs/eval/<mode>.yaml)")
    parser.add_argument("--train-fractions", default=None, metavar="F1,F2,..",
                        help="label-efficiency runs: fractions of the training labels, e.g. 1.0,0.75,0.5,0.25")
    parser.add_argument("--seeds", default=None, metavar="S1,S2,..", help="seeds per fraction, e.g. 0,1,2")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (default: the user cache, ~/.cache/dinov2_repro or "
                             "$DINOV2_REPRO_CACHE; keyed by content, so linear and knn share features)")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="eval config overrides")
    return parser


def _number_list(text: str, kind, flag: str) -> List:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: not a comma-separated list of numbers ({exc})") from exc
    if not values:
        raise ValueError(f"{flag} {text!r}: empty list")
    return values


def default_output_dir(mode: str, spec: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.rstrip("/")).name or spec).strip("_") or "backbone"
    return Path("runs") / "eval" / f"{mode}_{name}"


def config_overrides(args) -> List[str]:
    """The CLI flags as config overrides (flags first, so explicit key=value wins)."""
    overrides = []
    if args.train_fractions:
        overrides.append(f"train_fractions={_number_list(args.train_fractions, float, '--train-fractions')}")
    if args.seeds:
        overrides.append(f"seeds={_number_list(args.seeds, int, '--seeds')}")
    if args.cache_dir:
        overrides.append(f"cache_dir={args.cache_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.no_progress:
        overrides.append("progress=false")
    return overrides + list(args.overrides)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``dinov2-repro eval``; returns the exit status (2 on a usage or input error)."""
    from ..config.loader import ConfigError
    from .backbone_spec import BackboneSpecError
    from .config import default_preset, load_eval_config
    from .runner import evaluate

    parser = build_parser()
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        preset = Path(args.config) if args.config else default_preset(args.mode)
        cfg = load_eval_config(preset, config_overrides(args))
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.mode, args.backbone)
        result = evaluate(args.mode, cfg, args.data, output_dir, spec=args.backbone)
    except (ConfigError, BackboneSpecError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"dinov2-repro eval {args.mode}: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


def format_summary(result) -> str:
    """A few lines for the terminal: test accuracy per train fraction and the report path."""
    lines = [f"{result['mode']} on {result['backbone']['spec']}:"]
    for fraction, stats in sorted(result["summary"].items(), key=lambda kv: -float(kv[0])):
        acc = stats["accuracy"]
        spread = f" ± {acc['std'] * 100:.2f}" if acc["n"] > 1 else ""
        lines.append(f"  train fraction {float(fraction):.0%} ({stats['n_train']} images, {acc['n']} seed(s)): "
                     f"test accuracy {acc['mean'] * 100:.2f}%{spread}")
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
