"""How often is an image's nearest neighbour in a training batch of its own class?

KoLeo (DINOv2's regulariser) pushes every image's CLS token away from its nearest neighbour in the batch. When
that neighbour is usually of the same class, as with a handful of classes in a batch of 32, KoLeo spreads each
class out: a linear probe does not mind, a cosine k-NN vote does. This measures that share on a backbone's final
CLS features of a labelled set's training split (the features `benchmarks/learning.py` probes), over random
batches, beside the share a random neighbour would give. No training; seconds per backbone on 2 CPU cores.

    python benchmarks/batch_neighbours.py --data DIR random:RUN RUN [RUN ...]
    python benchmarks/batch_neighbours.py --data benchmark_runs/learning/sets/textures_v1 \\
        random:benchmark_runs/learning/runs/textures_seed0 benchmark_runs/learning/runs/textures_seed0

DIR holds Training/<class>/ images; a backbone is any spec `eval` takes (a run directory, `random:<run>`, ...).
Results are in docs/small_scale.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.learning import features  # noqa: E402


def same_class_neighbour_share(x: np.ndarray, y: np.ndarray, batch: int, n_batches: int,
                               seed: int = 0) -> Dict[str, float]:
    """x (N, D) features, y (N,) labels -> over ``n_batches`` random batches of ``batch`` distinct rows: ``share``,
    how often a row's most cosine-similar other row in its batch has its label, and ``chance``, how often a random
    other row of the batch would."""
    if not 2 <= batch <= len(x):
        raise ValueError(f"batch = {batch}: needs 2 <= batch <= the {len(x)} training images")
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    rng = np.random.default_rng(seed)
    rows = np.argsort(rng.random((n_batches, len(x))), axis=1)[:, :batch]  # (n_batches, batch) distinct rows
    xb, yb = x[rows], y[rows]  # (n_batches, batch, D), (n_batches, batch)
    sims = np.einsum("nid,njd->nij", xb, xb)
    diagonal = np.arange(batch)
    sims[:, diagonal, diagonal] = -np.inf  # a row is never its own neighbour
    same = yb[:, :, None] == yb[:, None, :]  # (n_batches, batch, batch)
    neighbour_same = np.take_along_axis(same, sims.argmax(axis=2)[:, :, None], axis=2)[..., 0]
    chance = (same.sum(axis=2) - 1) / (batch - 1)
    return dict(share=float(neighbour_same.mean()), chance=float(chance.mean()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbones", nargs="+", help="backbone specs, e.g. a run directory and random:<run>")
    parser.add_argument("--data", type=Path, required=True, help="a labelled folder with Training/<class>/ images")
    parser.add_argument("--batch", type=int, default=32, help="images per batch, as KoLeo sees them per GPU")
    parser.add_argument("--batches", type=int, default=2000, help="random batches to average over")
    args = parser.parse_args(argv)
    if not (args.data / "Training").is_dir():
        parser.error(f"--data {args.data}: no Training/ folder of class folders in it")
    print(f"| backbone | same-class nearest neighbour in a batch of {args.batch} | a random neighbour |")
    print("|---|---|---|")
    for spec in args.backbones:
        x, y = features(spec, args.data, splits=("Training",))["Training"]
        result = same_class_neighbour_share(x, y, args.batch, args.batches)
        print(f"| {spec} | {result['share']:.3f} | {result['chance']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
