"""benchmarks/view_consistency.py on a user's folder: identical views score 1 and find themselves, unreadable
images are skipped, and the source-pixel bound makes the views of tiny images closer."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import view_consistency  # noqa: E402

SMALL = ["crops.global_crops_size=32", "crops.local_crops_size=16", "data.augmentation=mri",
         "data.intensity_jitter=false"]


def table_row(out: str) -> list:
    row = [line for line in out.splitlines() if line.startswith("| /")][-1]
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.fixture(autouse=True)
def _keep_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_constant_images_give_identical_views(tmp_path, capsys):
    # A constant image stays the same constant under crop, flip and blur; below 128 solarize leaves it alone too.
    for i, level in enumerate(range(10, 120, 10)):
        Image.fromarray(np.full((40, 40), level, np.uint8)).save(tmp_path / f"{i:02d}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        view_consistency.main(["--data", str(tmp_path), "--images", "64", *SMALL])
    _, _, same, diff, margin, top1 = table_row(capsys.readouterr().out)
    assert float(same) == pytest.approx(1.0, abs=1e-3)
    assert float(diff) < 1.0 and float(margin) == pytest.approx(1.0, abs=1e-2)
    assert top1 == "100.0%"


def test_source_pixel_bound_brings_views_of_tiny_images_closer(tmp_path, capsys):
    # 8 x 8 "scans" of three random strokes, at the demo's 64 px views of 8 x 8 patches: without the bound the
    # crops cut the strokes by whole source pixels. Measured: margin 0.28-0.39 without, 0.83-0.88 with (4 draws).
    rng = np.random.default_rng(0)
    for i in range(64):
        image = np.zeros((8, 8), np.uint8)
        for _ in range(3):
            r, c = rng.integers(0, 8, 2)
            if rng.random() < 0.5:
                image[r, max(0, c - 3):c + 3] = 200
            else:
                image[max(0, r - 3):r + 3, c] = 200
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    rows = {}
    for px in (0, 1):
        view_consistency.main(["--data", str(tmp_path), "--images", "64", "--no-solarize", "data.augmentation=mri",
                               "data.intensity_jitter=false", f"crops.min_source_px_per_patch={px}"])
        rows[px] = table_row(capsys.readouterr().out)
    margin = {px: float(row[4]) for px, row in rows.items()}
    top1 = {px: float(row[5].rstrip("%")) for px, row in rows.items()}
    assert margin[1] > margin[0] + 0.3 and top1[1] > top1[0] + 30, rows
