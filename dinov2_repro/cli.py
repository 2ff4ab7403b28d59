"""The `dinov2-repro` command: a thin dispatcher over the modules that do the work.

Each subcommand lives in the module that owns it and exposes ``main(argv)``; this file only routes, so
``dinov2-repro --help`` stays fast (nothing heavy is imported until a subcommand runs).
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS = {
    "demo": ("dinov2_repro.demo", "end-to-end demo on built-in synthetic MRI: pretrain, evaluate, report"),
    "train": ("dinov2_repro.train.engine", "DINOv2 pretraining from a config (CPU, GPU, torchrun)"),
    "eval": ("dinov2_repro.eval.cli", "linear probe, k-NN or fine-tuning of a backbone on labelled images"),
    "predict": ("dinov2_repro.eval.predict", "class probabilities of new images from an evaluated classifier"),
    "data": ("dinov2_repro.data.cli", "synthetic data (synth), mean/std (stats), what a folder holds (inspect)"),
    "wsi": ("dinov2_repro.wsi.cli", "whole slides: tissue tiles (tile), tile PNGs (export), slide-level MIL (eval)"),
    "viz": ("dinov2_repro.viz.cli", "attention maps and patch-feature PCA of a backbone (beside a random one)"),
    "curate": ("dinov2_repro.curation.cli", "data curation: embed, dedup, decontaminate, cluster, sample, retrieve"),
    "info": ("dinov2_repro.models.info", "parameters, GFLOPs and token counts of a ViT"),
    "config": ("dinov2_repro.config.cli", "list the presets, or show the resolved config of one (with overrides)"),
    "submit": ("dinov2_repro.distributed.submit", "submit training or evaluation to SLURM through submitit"),
}

USAGE = "usage: dinov2-repro <command> [options]   (dinov2-repro <command> --help for details)"


def _help_text() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Quick start:  dinov2-repro demo      (5 to 8 minutes on 2 CPU cores, no download)"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_help_text())
        return 0
    if argv[0] in ("-V", "--version"):
        from dinov2_repro import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"dinov2-repro: unknown command {name!r}\n\n{_help_text()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
