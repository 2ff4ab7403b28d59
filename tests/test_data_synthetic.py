"""The built-in synthetic brain-MRI phantoms: layout, determinism, idempotence, class cues."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dinov2_repro.data.synthetic import (CLASSES, MARKER_FILE, PhantomRenderer, encode_png_gray, generate_dataset,
                                         render_phantom)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


def test_layout_counts_readme_and_marker(tmp_path):
    summary = generate_dataset(tmp_path / "s", n_per_class=5, seed=0, size=64)
    root = tmp_path / "s"
    for cls in CLASSES:
        assert len(list((root / "Training" / cls).glob("*.png"))) == 5
        assert len(list((root / "Testing" / cls).glob("*.png"))) == 1  # default max(1, 5 // 4)
    assert summary["n_images"] == 24 and summary["counts"]["Training"]["glioma"] == 5 and not summary["skipped"]
    readme = (root / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "NOT real patient data" in readme and "NO SUBSTITUTE" in readme
    assert json.loads((root / MARKER_FILE).read_text())["n_per_class"] == 5
    image = Image.open(root / "Training" / "pituitary" / "0003.png")
    assert image.mode == "L" and image.size == (64, 64)
    assert not list(root.rglob("*.tmp"))


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    generate_dataset(tmp_path / "a", n_per_class=2, seed=7, size=64, n_test_per_class=1)
    generate_dataset(tmp_path / "b", n_per_class=2, seed=7, size=64, n_test_per_class=1)
    generate_dataset(tmp_path / "c", n_per_class=2, seed=8, size=64, n_test_per_class=1)
    files = _files(tmp_path / "a")
    assert files == _files(tmp_path / "b") == _files(tmp_path / "c") and len(files) == 12
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert all((tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes() for rel in files)
    # render_phantom gives exactly the pixels that were written
    written = np.asarray(Image.open(tmp_path / "a" / "Testing" / "meningioma" / "0000.png"))
    assert np.array_equal(written, render_phantom("meningioma", seed=7, index=0, size=64, split="Testing"))


def test_generation_is_idempotent_and_refuses_other_parameters(tmp_path):
    root = tmp_path / "s"
    generate_dataset(root, n_per_class=2, size=64)
    first = root / "Training" / "glioma" / "0000.png"
    stamp = first.stat().st_mtime_ns
    again = generate_dataset(root, n_per_class=2, size=64)
    assert again["skipped"] and first.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="n_per_class"):
        generate_dataset(root, n_per_class=3, size=64)


def test_a_users_folder_is_never_written_to(tmp_path, capsys):
    """The demo preset says data.kind=synthetic; pointed at a folder of the user's own images it must stop with
    one line and leave the folder exactly as it was (it used to add 1,400 phantoms and a README there)."""
    from dinov2_repro.train import engine

    user = tmp_path / "my_scans"
    (user / "patient_1").mkdir(parents=True)
    Image.new("L", (32, 32), 90).save(user / "patient_1" / "slice.png")
    before = sorted((p.relative_to(user), p.stat().st_mtime_ns) for p in user.rglob("*"))
    status = engine.main(["--config", "demo_cpu", f"data.path={user}", "--output-dir", str(tmp_path / "run")])
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dinov2-repro train:")]
    assert len(lines) == 1 and f"{user} is not empty and was not made by the synthetic generator" in lines[0]
    assert "data.kind=auto" in lines[0]
    assert sorted((p.relative_to(user), p.stat().st_mtime_ns) for p in user.rglob("*")) == before
    # a new folder, an empty one, and one whose generation was interrupted are fine
    generate_dataset(tmp_path / "new", n_per_class=1, size=32)
    (tmp_path / "empty").mkdir()
    generate_dataset(tmp_path / "empty", n_per_class=1, size=32)
    interrupted = tmp_path / "interrupted"
    generate_dataset(interrupted, n_per_class=1, size=32)
    (interrupted / MARKER_FILE).rename(interrupted / ".synthetic_in_progress.json")  # as if killed before the end
    assert not generate_dataset(interrupted, n_per_class=1, size=32)["skipped"]
    assert (interrupted / MARKER_FILE).is_file() and not (interrupted / ".synthetic_in_progress.json").exists()


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png_gray(array)))), array)
    with pytest.raises(ValueError, match="uint8"):
        encode_png_gray(array.astype(np.uint16))


def test_mean_intensity_is_a_poor_class_cue():
    renderer = PhantomRenderer(64)

    def means(seed, n=40):
        return {c: np.array([render_phantom(c, seed, i, 64, renderer=renderer).mean() for i in range(n)])
                for c in CLASSES}

    # Nearest-class-mean classifier on mean intensity alone, fitted on one seed, tested on another:
    # well below what the images allow (chance is 0.25).
    fit, test = means(0), means(1)
    centres = np.array([fit[c].mean() for c in CLASSES])
    correct = sum(int(np.argmin(np.abs(centres - m)) == k) for k, c in enumerate(CLASSES) for m in test[c])
    assert correct / (40 * len(CLASSES)) < 0.45



def test_lesions_sit_where_their_class_puts_them():
    # Anatomy, lesion and acquisition use separate random streams, so with one RNG seed a glioma or meningioma
    # phantom is the notumor phantom plus its lesion: the changed pixels show where the lesion is.
    renderer = PhantomRenderer(128)
    yy, xx = np.mgrid[0:128, 0:128]
    for seed in range(6):
        healthy = renderer.render("notumor", np.random.default_rng(seed)).astype(int)
        for label, (r_min, r_max) in (("glioma", (0.0, 0.42)), ("meningioma", (0.45, 1.1))):
            changed = np.abs(renderer.render(label, np.random.default_rng(seed)).astype(int) - healthy) > 12
            assert 0.002 < changed.mean() < 0.35, (label, seed, changed.mean())
            cy, cx = yy[changed].mean(), xx[changed].mean()
            radius = np.hypot(cy - 63.5, cx - 63.5) / 63.5  # 0 = centre, 1 = image edge
            assert r_min <= radius <= r_max, (label, seed, radius)  # glioma intra-axial, meningioma at the skull


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown phantom class"):
        render_phantom("astrocytoma")
    with pytest.raises(ValueError, match="n_per_class"):
        generate_dataset("/nonexistent/never", n_per_class=0)


def test_pretraining_config_sets_the_test_split_size(tmp_path):
    # data.synthetic_n_test_per_class reaches the generator; pretraining itself reads only Training.
    from dinov2_repro.config import configs_dir, load_config
    from dinov2_repro.data.loaders import build_ssl_dataset

    root = tmp_path / "s"
    cfg = load_config(configs_dir() / "train" / "demo_cpu.yaml",
                      [f"data.path={root}", "data.synthetic_n_per_class=3", "data.synthetic_n_test_per_class=2"])
    dataset = build_ssl_dataset(cfg)
    assert len(dataset) == 3 * len(CLASSES)
    assert all(len(list((root / "Testing" / c).glob("*.png"))) == 2 for c in CLASSES)
    assert json.loads((root / MARKER_FILE).read_text())["n_test_per_class"] == 2
