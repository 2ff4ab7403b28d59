"""``python -m dinov2_repro.train --config ...``: the training CLI (what torchrun launches)."""

import sys

from dinov2_repro.train.engine import main

if __name__ == "__main__":
    sys.exit(main())
