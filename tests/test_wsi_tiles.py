"""Tiles streamed from the slides (data.kind=wsi_tiles): equal to the source pixels, grouped by slide, found by
data.kind=auto, fed to a short pretraining, exported as PNG files."""

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("tifffile")

from wsi_slides import draw_slide, write_test_slides  # noqa: E402

from dinov2_repro.data.loaders import build_image_dataset, resolve_data_kind  # noqa: E402
from dinov2_repro.wsi import TileOptions, tile_slides  # noqa: E402
from dinov2_repro.wsi.tiles import WsiTileDataset, export_tiles, split_tile_sample  # noqa: E402


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """Tables of two slides (one read by openslide, one by tiffslide) at 0.5 um (level 1, 64-px tiles) and the
    pyramid levels they come from."""
    slides = tmp_path_factory.mktemp("slides")
    levels = write_test_slides(slides, draw_slide(1536, 1024, seed=1)[0], mpp=0.25)
    tables = tmp_path_factory.mktemp("tables")
    tile_slides([slides / "tiled.tif", slides / "stripped.tif"], tables,
                TileOptions(mpp=0.5, tile_size=64, thumbnail_size=512), progress=False)
    return tables, levels


def test_streamed_tiles_equal_the_source_pixels_and_group_by_slide(tiled):
    tables, levels = tiled
    dataset = build_image_dataset(str(tables), "wsi_tiles")
    assert isinstance(dataset, WsiTileDataset) and resolve_data_kind(str(tables)) == "wsi_tiles"
    assert resolve_data_kind(str(tables / "tiled.tiles.csv")) == "wsi_tiles"
    assert sorted(set(dataset.groups)) == ["stripped", "tiled"] and len(dataset) > 10
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        image, label = dataset[index]
        _, t = split_tile_sample(dataset.samples[index][0])
        x, y = t["x"] // 2, t["y"] // 2
        assert label == -1 and image.dtype == torch.uint8
        assert np.array_equal(image.permute(1, 2, 0).numpy(), levels[1][y: y + 64, x: x + 64])
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned loader worker gets: no open handles, its own
    assert not copy.handles.open and torch.equal(copy[0][0], dataset[0][0])


def test_loader_workers_open_their_own_slide_handles(tiled):
    tables, _ = tiled
    dataset = WsiTileDataset(tables)
    expected = torch.stack([dataset[i][0] for i in range(8)])  # handles opened here first, then forked
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(8)), batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)


def test_a_resized_tile_and_a_missing_slide(tiled, tmp_path):
    tables, _ = tiled
    row = (tables / "tiled.tiles.csv").read_text().splitlines()
    header, first = row[0], row[1].split(",")
    first[6] = "96"  # read 96 px of level 1 into a 64-px tile, as for a target between two levels
    moved = first.copy()
    moved[1] = str(tmp_path / "gone.tif")
    (tmp_path / "t.tiles.csv").write_text("\n".join([header, ",".join(first), ",".join(moved)]) + "\n")
    dataset = WsiTileDataset(tmp_path / "t.tiles.csv")
    assert tuple(dataset[0][0].shape) == (3, 64, 64)
    with pytest.warns(RuntimeWarning, match="gone.tif"):
        assert dataset[1] is None


def test_streamed_tiles_feed_a_short_pretraining(tiled, tmp_path):
    from test_engine_common import tiny_cfg

    from dinov2_repro.train.engine import train

    tables, _ = tiled
    cfg = tiny_cfg(f"data.path={tables}", "data.kind=wsi_tiles", "train.max_iterations=2",
                   "data.augmentation=histology")
    assert train(cfg, tmp_path / "run")["iterations"] == 2
    assert f"data: wsi_tiles at {tables}" in (tmp_path / "run" / "train.log").read_text()


def test_export_writes_png_tiles_and_a_manifest_and_resumes(tiled, tmp_path):
    from dinov2_repro.wsi.cli import main

    tables, levels = tiled
    assert main(["export", str(tables / "tiled.tiles.csv"), "--out", str(tmp_path), "--no-progress"]) == 0
    pngs = sorted((tmp_path / "tiled").glob("*.png"))
    manifest = (tmp_path / "tiles.csv").read_text().splitlines()
    assert manifest[0] == "path,group" and len(manifest) == len(pngs) + 1 and manifest[1].endswith(",tiled")
    again = export_tiles(tables / "tiled.tiles.csv", tmp_path, progress=False)
    assert again["written"] == 0 and again["n_tiles"] == len(pngs)
