"""benchmarks/learning.py's reading of a run: which terms engaged, on hand-made metrics with known answers."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.learning import training_signals  # noqa: E402

LOG_K = math.log(1024)


def write_run(run_dir: Path, dino_loss: float, entropy: float, kl_to_uniform) -> Path:
    run_dir.mkdir()
    lines = [dict(iteration=i, teacher_entropy=entropy, teacher_kl_to_uniform=kl_to_uniform, dino_loss=dino_loss,
                  ibot_loss=2.0, koleo_loss=1.0 - i / 100) for i in range(5, 105, 5)]
    if kl_to_uniform is None:  # metrics written before the KL was logged
        for line in lines:
            del line["teacher_kl_to_uniform"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def test_dino_engages_only_with_per_image_targets(tmp_path):
    # Sharp targets spread over the batch's prototypes: engaged.
    healthy = training_signals(write_run(tmp_path / "a", 3.0, 0.5 * LOG_K, 0.3), 1024, warmup_iterations=10)
    assert healthy["engaged"] == {"dino": True, "ibot": True, "koleo": True}
    assert healthy["entropy_after_warmup_max"] == 0.5
    # A uniform teacher: the loss sits at log K.
    uniform = training_signals(write_run(tmp_path / "b", LOG_K, LOG_K, 0.0), 1024, warmup_iterations=10)
    assert not uniform["engaged"]["dino"]
    # Every image on one prototype: a low loss, but the targets say nothing about the image.
    one = training_signals(write_run(tmp_path / "c", 0.1, 0.0, LOG_K - 1e-3), 1024, warmup_iterations=10)
    assert not one["engaged"]["dino"] and one["engaged"]["ibot"]
    # No KL logged: nothing says the images share a target, so the low loss counts.
    unknown = training_signals(write_run(tmp_path / "d", 3.0, 0.5 * LOG_K, None), 1024, warmup_iterations=10)
    assert unknown["engaged"]["dino"]
