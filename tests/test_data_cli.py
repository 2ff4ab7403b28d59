"""`dinov2-repro data synth|stats` and the exact mean/std computation."""

import json

import numpy as np
import pytest
from PIL import Image

from dinov2_repro.data.cli import main
from dinov2_repro.data.datasets import UnlabeledFolderDataset
from dinov2_repro.data.stats import compute_mean_std, histogram_moments


def test_mean_std_by_hand(tmp_path):
    Image.new("L", (4, 4), 0).save(tmp_path / "black.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "white.png")
    Image.new("RGB", (4, 8), (255, 0, 51)).save(tmp_path / "reddish.png")  # twice the pixels of the others
    stats = compute_mean_std(UnlabeledFolderDataset(tmp_path), progress=False)
    # channel R: 16 x 0, 16 x 1, 32 x 1 -> mean 0.75, var = 0.75 - 0.5625
    # channel G: 16 x 1 of 64 -> mean 0.25; channel B: 16 x 1 + 32 x 0.2 -> mean (16 + 6.4) / 64 = 0.35
    assert stats["mean"] == pytest.approx([0.75, 0.25, 0.35])
    assert stats["std"] == pytest.approx([np.sqrt(0.75 - 0.5625), np.sqrt(0.25 - 0.0625),
                                          np.sqrt((16 + 32 * 0.04) / 64 - 0.35**2)])
    assert stats["n_images"] == 3 and stats["n_pixels"] == 64 and stats["n_skipped"] == 0


def test_histogram_moments_match_numpy():
    values = np.random.default_rng(0).integers(0, 256, (3, 1000))
    hist = np.stack([np.bincount(v, minlength=256) for v in values])
    mean, std = histogram_moments(hist)
    assert np.allclose(mean, values.mean(1) / 255) and np.allclose(std, (values / 255).std(1))


def test_stats_cli_yaml_json_and_corrupt_files(tmp_path, capsys):
    for cls, value in (("a", 51), ("b", 102)):
        (tmp_path / "d" / "Training" / cls).mkdir(parents=True)
        Image.new("L", (2, 2), value).save(tmp_path / "d" / "Training" / cls / "x.png")
    (tmp_path / "d" / "Testing").mkdir()
    (tmp_path / "d" / "Training" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert main(["stats", "--data", str(tmp_path / "d"), "--split", "Training", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data.mean: [0.3000, 0.3000, 0.3000]" in out  # (51 + 102) / 2 / 255
    assert "data.std: [0.1000, 0.1000, 0.1000]" in out
    assert "1 unreadable" in out
    with pytest.warns(RuntimeWarning):
        main(["stats", "--data", str(tmp_path / "d"), "--json", "--no-progress", "--max-images", "2"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["mean"]) == 3 and result["n_images"] + result["n_skipped"] == 2


def test_synth_cli(tmp_path, capsys):
    out_dir = tmp_path / "synth"
    args = ["synth", "--out", str(out_dir), "--n-per-class", "2", "--size", "64", "--n-test-per-class", "1",
            "--no-progress"]
    assert main(args) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(list(out_dir.rglob("*.png"))) == 4 * 3
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out_dir)])  # --n-per-class is required


def test_inspect_counts_classes_and_names_every_unreadable_file_and_volume(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dinov2_repro.data.cli import main as data_main

    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(tmp_path / "imgs" / label / f"{i}.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png")
    sheet = tmp_path / "sheet.png"
    assert data_main(["inspect", "--data", str(tmp_path / "imgs"), "--no-progress", "--contact-sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "7 images" in out and "per class: a 3, b 4" in out and "unreadable on decoding: 1" in out
    assert "broken.png" in out and sheet.is_file() and sheet.stat().st_size > 1000

    nib = pytest.importorskip("nibabel")
    volume = np.zeros((6, 6, 5), np.float32)
    volume[1:5, 1:5, 1:4] = 100
    for subject in ("s1", "s2"):
        (tmp_path / "vols" / subject).mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "vols" / subject / "t1.nii.gz"))
    (tmp_path / "vols" / "s3").mkdir()
    (tmp_path / "vols" / "s3" / "t1.nii.gz").write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="unreadable volume"):
        assert data_main(["inspect", "--data", str(tmp_path / "vols"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "VolumeSliceDataset" in out and "6 images (slices) from 2 volume(s)" in out
    assert "skipped while indexing (1):" in out and "s3/t1.nii.gz" in out and "unreadable on decoding: 0" in out
