"""Whole-slide tiling on slides the tests draw (tests/wsi_slides.py): readers, level choice, tissue detection,
tiles, resume and bad slides."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("tifffile")

from wsi_slides import GLASS, draw_slide, write_slide, write_test_slides  # noqa: E402

from dinov2_repro.wsi import TileOptions, choose_level, open_slide, tile_slide, tile_slides, tissue_mask  # noqa: E402
from dinov2_repro.wsi.levels import ResolutionError, target_downsample  # noqa: E402
from dinov2_repro.wsi.reader import available_backends  # noqa: E402

MPP = 0.25  # level 0 of the drawn slides; levels at 0.5, 1, 2
FAST = dict(tile_size=128, thumbnail_size=1024)


@pytest.fixture(scope="module")
def drawn():
    return draw_slide(3072, 2048, seed=0)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, drawn):
    """A folder with a tiled pyramid, a stripped one (openslide refuses it) and one without resolution tags."""
    folder = tmp_path_factory.mktemp("slides")
    return folder, write_test_slides(folder, drawn[0], MPP)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_both_readers_open_the_tiled_pyramid_and_tiffslide_takes_what_openslide_refuses(slides):
    folder, levels = slides
    for backend in available_backends():
        with open_slide(folder / "tiled.tif", backend) as slide:
            assert slide.level_count == 4 and slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
            assert slide.mpp == pytest.approx(MPP)
            assert np.array_equal(slide.read_region(512, 256, 1, (64, 32)), levels[1][128:160, 256:320])
    with open_slide(folder / "stripped.tif") as slide:
        assert slide.backend == "tiffslide" and slide.mpp == pytest.approx(MPP)


def test_level_choice_for_a_target_resolution():
    downsamples = (1.0, 2.0, 4.0, 8.0)
    exact = choose_level(downsamples, 0.5 / MPP, 256, MPP)
    assert (exact.level, exact.read_size, exact.extent, exact.mpp) == (1, 256, 512, pytest.approx(0.5))
    near = choose_level(downsamples, 0.53 / MPP, 256, MPP)  # within 10% of level 1: read as it is
    assert (near.level, near.read_size) == (1, 256)
    between = choose_level(downsamples, 0.7 / MPP, 256, MPP)  # no level within 10%: the next finer, resized
    assert (between.level, between.read_size) == (1, 358) and between.mpp == pytest.approx(0.7, rel=0.01)
    assert target_downsample(MPP, None, None, 20, "s")[0] == pytest.approx(2.0)  # 20x = 0.5 um
    assert target_downsample(None, 40.0, None, 20, "s")[0] == pytest.approx(2.0)  # objective power alone
    with pytest.raises(ResolutionError, match="slideX.*no resolution metadata.*--mpp"):
        target_downsample(None, None, None, None, "slideX")


def test_tissue_area_within_tolerance_and_pen_excluded(slides, drawn):
    from skimage.transform import resize

    _, tissue, pen = drawn
    with open_slide(slides[0] / "tiled.tif") as slide:
        mask = tissue_mask(slide.thumbnail(1024))
    truth = resize(tissue, mask.shape, order=0)
    assert abs(mask.mean() - truth.mean()) <= 0.03 * truth.mean()  # stated tolerance: 3% of the true area
    assert (mask & ~truth).mean() < 0.01 * truth.mean() and (truth & ~mask).mean() < 0.03 * truth.mean()
    assert not (mask & resize(pen, mask.shape, order=0)).any()


def test_tiles_at_the_right_level_read_back_equal_the_source(slides, tmp_path):
    folder, levels = slides
    summary = tile_slide(folder / "tiled.tif", tmp_path, TileOptions(mpp=0.5, **FAST))
    rows = read_rows(tmp_path / "tiled.tiles.csv")
    assert summary["n_tiles"] == len(rows) > 5 and summary["level"] == 1
    assert all(r["level"] == "1" and r["size"] == r["read_size"] == "128" and float(r["mpp"]) == 0.5 for r in rows)
    assert all(float(r["tissue_fraction"]) >= 0.6 for r in rows)
    with open_slide(folder / "tiled.tif") as slide:
        for r in rows[:: max(1, len(rows) // 4)]:
            x, y = int(r["x"]), int(r["y"])
            tile = slide.read_region(x, y, 1, (128, 128))
            assert np.array_equal(tile, levels[1][y // 2: y // 2 + 128, x // 2: x // 2 + 128])
            assert (tile.astype(int).sum(-1) < 3 * 220).mean() > 0.5  # tissue, not glass
    assert (tmp_path / "tiled.thumbnail.png").stat().st_size > 0


def test_resume_skips_finished_slides_and_redoes_killed_ones(slides, tmp_path):
    folder, _ = slides
    options = TileOptions(mpp=0.5, **FAST)
    first = tile_slides([folder / "tiled.tif", folder / "stripped.tif"], tmp_path, options, progress=False)
    assert len(first["done"]) == 2
    (tmp_path / "stripped.done.json").unlink()  # killed after its table, before its marker
    (tmp_path / "stripped.tiles.csv").write_text("slide_id,slide\nhalf", encoding="utf-8")
    again = tile_slides([folder / "tiled.tif", folder / "stripped.tif"], tmp_path, options, progress=False)
    assert [r["slide_id"] for r in again["skipped"]] == ["tiled"]
    assert [r["slide_id"] for r in again["done"]] == ["stripped"]
    assert len(read_rows(tmp_path / "stripped.tiles.csv")) == first["done"][1]["n_tiles"]
    assert json.loads((tmp_path / "stripped.done.json").read_text())["reader"] == "tiffslide"


def test_corrupt_and_resolutionless_slides_are_named_and_skipped(slides, tmp_path):
    from dinov2_repro.wsi.cli import main

    folder, _ = slides
    bad = tmp_path / "in" / "corrupt.svs"
    bad.parent.mkdir()
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    lines = []
    results = tile_slides([bad, folder / "nores.tif", folder / "tiled.tif"], tmp_path / "out",
                          TileOptions(mpp=0.5, **FAST), progress=False, log=lines.append)
    assert [r["slide_id"] for r in results["done"]] == ["tiled"] and len(results["failed"]) == 2
    assert len(lines) == 2 and "corrupt.svs" in lines[0] and "no resolution metadata" in lines[1]
    assert not list(bad.parent.glob("*.csv")) and not list(folder.glob("*.csv"))  # slide folders untouched
    assert main(["tile", str(folder / "nores.tif"), "--out", str(tmp_path / "cli"), "--slide-mpp", "0.25",
                 "--mpp", "1.0", "--tile-size", "64", "--no-progress"]) == 0
    assert read_rows(tmp_path / "cli" / "nores.tiles.csv")[0]["level"] == "2"


def test_parallel_workers_tile_every_slide(slides, tmp_path):
    folder, _ = slides
    results = tile_slides([folder / "tiled.tif", folder / "stripped.tif"], tmp_path, TileOptions(mpp=1.0, **FAST),
                          workers=2, progress=False)
    assert sorted(r["slide_id"] for r in results["done"]) == ["stripped", "tiled"]


def test_a_missing_reader_names_the_extra():
    from dinov2_repro.wsi.reader import require

    with pytest.raises(ImportError, match=r"pip install dinov2_repro\[wsi\]"):
        require("no_such_slide_reader")


def test_a_real_histology_image_embedded_in_a_slide(tmp_path):
    """scikit-image's immunohistochemistry image (a real micrograph of colon tissue, DAB and haematoxylin) on glass:
    the tissue found is within 10% of the image's area, and the tiles kept are the ones inside it."""
    from skimage.data import immunohistochemistry

    rgb = np.empty((2048, 3072, 3), np.uint8)
    rgb[:] = GLASS
    top, left, side = 512, 1024, 1024
    rgb[top: top + side, left: left + side] = np.kron(immunohistochemistry(), np.ones((2, 2, 1), np.uint8))
    write_slide(tmp_path / "ihc.tif", rgb, mpp=MPP)
    summary = tile_slide(tmp_path / "ihc.tif", tmp_path / "out", TileOptions(mpp=0.5, **FAST))
    truth = side * side / rgb[..., 0].size
    assert abs(summary["tissue_fraction"] - truth) <= 0.1 * truth, (summary["tissue_fraction"], truth)
    inside = [(x, y) for y in range(0, 2048 - 255, 256) for x in range(0, 3072 - 255, 256)
              if left <= x and x + 256 <= left + side and top <= y and y + 256 <= top + side]
    kept = {(int(r["x"]), int(r["y"])) for r in read_rows(tmp_path / "out" / "ihc.tiles.csv")}
    assert kept == set(inside), (len(kept), len(inside))
