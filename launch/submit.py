#!/usr/bin/env python3
"""Submit DINOv2 pretraining or an evaluation to SLURM through submitit (same as `dinov2-repro submit`).

    python launch/submit.py --nodes 1 --gpus-per-node 8 --partition gpu --time 24:00:00 \
        -- --config configs/train/vitb14_8gpu.yaml data.path=/datasets/brain_mri

Run `python launch/submit.py --help` for the options; the code lives in `dinov2_repro/distributed/submit.py`.
"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Work from a plain checkout (no `pip install -e .`): the package sits one level up. PYTHONPATH also
    # reaches the job, since sbatch exports the submitting environment (--export=ALL is SLURM's default).
    repo = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    from dinov2_repro.distributed.submit import main

    raise SystemExit(main())
