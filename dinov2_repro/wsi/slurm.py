"""`wsi tile` as a SLURM job array (``dinov2-repro submit --task wsi_tile``).

Array task I of N tiles the slides ``sorted(slides)[I::N]`` (``wsi tile --shard I/N``) into the one ``--out``
folder. Tiling is resumable per slide, so a task that is requeued after a time-out or preemption, or a whole array
submitted again, skips every slide already done. submitit is imported here because only ``submit`` and the jobs
import this module.
"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path
from typing import List, Sequence, Tuple

from submitit.helpers import Checkpointable

MAX_ARRAY_TASKS = 256


class WsiTileJob(Checkpointable):
    """One array task: ``dinov2-repro wsi tile <args> --shard index/count``; rerun whole on a time-out."""

    def __init__(self, tile_args: Sequence[str], index: int, count: int) -> None:
        self.tile_args, self.index, self.count = [str(a) for a in tile_args], int(index), int(count)

    @property
    def argv(self) -> List[str]:
        return ["tile", *self.tile_args, "--shard", f"{self.index}/{self.count}"]

    def __call__(self) -> int:
        from .cli import main as wsi_main

        print(f"[dinov2-repro job] host {socket.gethostname()}: dinov2-repro wsi {shlex.join(self.argv)}", flush=True)
        status = wsi_main(self.argv)
        if status:
            raise RuntimeError(f"dinov2-repro wsi {shlex.join(self.argv)} exited with status {status}")
        return 0


def prepare_tile_array(tile_args: Sequence[str], array_tasks: int = 0) -> Tuple[Path, List[WsiTileJob], int]:
    """(the --out folder, one job per array task, the number of slides) for ``wsi tile`` arguments, checked here
    (on the login node) with the command's own parser. ``array_tasks`` 0: one task per slide, at most 256."""
    from .cli import find_slides, parse_tile_args

    try:
        args = parse_tile_args(list(tile_args))
    except SystemExit as exc:  # argparse has printed the problem
        raise ValueError(f"bad `wsi tile` arguments after '--': {shlex.join(tile_args)}") from exc
    if args.shard is not None:
        raise ValueError("--shard is set per array task by submit; leave it out of the tiling arguments")
    slides = find_slides(args.slides)
    if not slides:
        raise ValueError(f"no slides found in {args.slides}")
    if array_tasks < 0:
        raise ValueError(f"--array-tasks {array_tasks}: must be >= 0 (0: one task per slide)")
    count = min(len(slides), array_tasks or MAX_ARRAY_TASKS)
    return Path(args.out).absolute(), [WsiTileJob(tile_args, i, count) for i in range(count)], len(slides)
