"""benchmarks/wsi.py runs end to end on a small slide and reports consistent figures (no speed is asserted)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("openslide")
pytest.importorskip("tiffslide")
pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import wsi  # noqa: E402


def test_wsi_benchmark_reports_positive_consistent_figures(tmp_path, capsys):
    previous = torch.get_num_threads()
    try:
        out = wsi.main(["--width", "2048", "--height", "1536", "--levels", "2", "--upscale", "1",
                        "--thumbnail-size", "256", "--repeats", "1", "--cold-tiles", "2", "--augment-tiles", "2",
                        "--json-out", str(tmp_path / "wsi.json")])
    finally:
        torch.set_num_threads(previous)
    report = json.loads((tmp_path / "wsi.json").read_text())
    assert report == json.loads(json.dumps(out, default=str))
    assert report["slide"]["level_sizes"] == [[2048, 1536], [512, 384]]
    tissue, tiling = report["tissue"], report["tiling"]
    assert tissue["thumbnail_s"] > 0 and tissue["mask_s"] > 0 and tissue["total_s"] > 0
    assert abs(tissue["tissue_fraction_found"] - report["slide"]["tissue_fraction_true"]) < 0.05
    # 0.5 µm/px from a 0.25 µm/px slide whose next level is 4x coarser: level 0, 512 px read per 256 px tile
    assert (tiling["level"], tiling["read_size"]) == (0, 512)
    assert 0 < tiling["tiles_kept"] <= tiling["grid_tiles"] == 4 * 3 and tiling["seconds"] > 0
    for reader in ("openslide", "tiffslide"):
        entry = report["read"][reader]
        assert entry["backend"] == reader
        assert entry["warm"]["tiles"] == tiling["tiles_kept"]
        assert entry["cold"]["tiles"] == min(2, tiling["tiles_kept"])
        assert entry["cold"]["tiles_per_s"] > 0 and entry["warm"]["tiles_per_s"] > 0
    assert report["readers_max_abs_diff"] == 0  # both readers decode the same tile to the same pixels
    assert report["augment"]["crops"] == "2 x 224 + 8 x 96"
    for preset in ("histology", "dinov2"):
        assert report["augment"][preset]["tiles"] == min(2, tiling["tiles_kept"])
        assert report["augment"][preset]["tiles_per_s"] > 0
    assert len(report["loadavg_start"]) == 3 and len(report["loadavg_end"]) == 3
    printed = capsys.readouterr().out
    assert "load average" in printed and "tiles kept" in printed and torch.__version__ in printed
