"""benchmarks/augmentation.py runs and reports every row (no speed is asserted), and its copy of the published
DINOv2 composition keeps the published blur probabilities (its GaussianBlur hands 1 - p to RandomApply)."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import augmentation  # noqa: E402


def test_benchmark_reports_each_input_mode_and_pipeline(tmp_path, capsys):
    previous = torch.get_num_threads()
    try:
        out = augmentation.main(["--n-images", "2", "--seconds", "0.2", "--rounds", "1", "--local-number", "1",
                                 "--json-out", str(tmp_path / "aug.json")])
    finally:
        torch.set_num_threads(previous)
    rows = json.loads((tmp_path / "aug.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(out["rows"]))
    assert {(r["input"], r["mode"]) for r in rows} == {(i, m) for i in ("colour", "gray") for m in ("decoded", "jpeg")}
    assert len(rows) == 12 and all(r["images"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["pipeline"].startswith("published"))
    assert "load 1 min" in capsys.readouterr().out


def test_published_copy_blur_probabilities():
    published = augmentation.PublishedDINOv2Augmentation(local_crops_number=1)

    def blur_apply_p(compose):
        blurs = [t for t in compose.transforms if type(t).__name__ == "RandomApply"
                 and type(t.transforms[0]).__name__ == "GaussianBlur"]
        if not blurs:  # global 2: nested Compose([GaussianBlur, RandomSolarize])
            blurs = [t for c in compose.transforms if type(c).__name__ == "Compose" for t in c.transforms
                     if type(t).__name__ == "RandomApply" and type(t.transforms[0]).__name__ == "GaussianBlur"]
        return blurs[0].p

    assert blur_apply_p(published.global_transfo1) == 0.0
    assert abs(blur_apply_p(published.global_transfo2) - 0.9) < 1e-12
    assert blur_apply_p(published.local_transfo) == 0.5
