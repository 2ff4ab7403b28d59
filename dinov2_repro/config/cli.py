"""``dinov2-repro config``: see what a preset resolves to before running it.

    dinov2-repro config list                                # the presets that ship with the package
    dinov2-repro config show demo_cpu train.batch_size_per_gpu=16
    dinov2-repro config show knn                            # evaluation presets too
    dinov2-repro config show runs/vits14/config.yaml        # any YAML file
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinov2-repro config", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("action", choices=("show", "list"))
    parser.add_argument("preset", nargs="?", default=None,
                        help="a preset name or YAML file (default: the published pretraining defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def resolved_yaml(preset: Optional[str], overrides: List[str]) -> str:
    """The validated config of ``preset`` + ``overrides`` as YAML: a pretraining preset, or an evaluation one when
    it lives in the package's ``configs/eval``."""
    from omegaconf import OmegaConf

    from .loader import configs_dir, load_config, resolve_preset

    path = resolve_preset(preset) if preset else None
    if path is not None and path.resolve().parent == (configs_dir() / "eval").resolve():
        from ..eval.config import load_eval_config

        return OmegaConf.to_yaml(load_eval_config(path, overrides))
    return OmegaConf.to_yaml(load_config(path, overrides))


def main(argv: Optional[List[str]] = None) -> int:
    from .loader import ConfigError, configs_dir

    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.action == "list":
        for path in sorted(configs_dir().glob("*/*.yaml")):
            print(f"{path.parent.name:6s} {path.stem}")
        return 0
    try:
        print(resolved_yaml(args.preset, args.overrides), end="")
    except ConfigError as exc:
        print(f"dinov2-repro config: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
