"""End to end: does a short pretraining learn anything at all?

A short pretraining (demo preset with the recipe's LayerScale init 1e-5, teacher temperature 0.07 and intensity
jitter; real data pipeline and augmentation, engine, EMA teacher, export) on a toy set
whose four classes differ in shape (discs, squares, striped squares, rings; random place, size and brightness)
must give teacher features that k-NN classifies far better than the same network at initialisation
(`random:<run>`), both loaded and featurised through the evaluation's own path. Measured 2026-11-29 on 2 CPU
cores with the preset's square-root lr rule (peak 7.1e-4): 0.42 vs 0.24, chance 0.25. (2026-11-23, with the
unscaled lr 0.004 that this toy set tolerated and real images did not: 0.51 vs 0.24.)

What it catches: a teacher that never moves, an export or SPEC loader that drops the weights, crops that destroy
the image, a step that does not train. What it does not: a DINO or iBOT pairing bug. At this budget the gain
comes from KoLeo (with a plain resize and a majority vote: KoLeo alone about 0.45, DINO and iBOT alone at the
random level, and swapping the teacher's targets between images changed nothing), most likely because from
LayerScale 1e-5 the teacher's CLS targets are still nearly image-independent after 120 iterations. The DINO and
iBOT terms are checked by the loss tests and by tests/test_dino_engages.py instead.

The second test does the same on real scans (scikit-learn's digits) with the demo preset as shipped.

Why not the demo preset's own short-run settings (LayerScale 1.0, teacher temperature 0.04, no intensity jitter):
they were chosen on the phantoms, and at this test's budget they leave too little room over their own random twin
(LayerScale 1.0 features already separate the toy shapes): 0.39 vs 0.37, measured 2026-11-23. The demo reports on
them, with a paired interval, on the phantoms.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_repro.config import configs_dir, load_config
from dinov2_repro.data.datasets import open_labeled_dataset
from dinov2_repro.eval.backbone_spec import load_backbone
from dinov2_repro.eval.features import EvalTransform, extract_features
from dinov2_repro.eval.knn import knn_probabilities
from dinov2_repro.train.engine import train

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))

CLASSES = ("disc", "square", "stripes", "ring")

# The recipe's settings, where the demo preset departs from them for its short phantom runs.
RECIPE_INIT = ["student.layerscale=1e-5", "teacher.teacher_temp=0.07", "data.intensity_jitter=true"]


def toy_shape(label: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Two bright objects of one kind on a dark noisy background, uint8 (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), rng.uniform(10, 60), np.float32)
    for _ in range(2):
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        dx, dy = xx - cx, yy - cy
        square = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        mask = {"disc": dx**2 + dy**2 <= r**2,
                "square": square,
                "stripes": square & ((dx + r) % (0.5 * r) < 0.25 * r),
                "ring": np.abs(np.sqrt(dx**2 + dy**2) - r) <= 0.12 * r + 1}[label]
        img[mask] = rng.uniform(140, 255)
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_toy_set(root, n_train: int, n_test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("Training", n_train), ("Testing", n_test)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(toy_shape(label, rng)).save(root / split / label / f"{i:03d}.png")


def knn_accuracy(spec: str, root) -> float:
    """Test-split accuracy of the weighted 10-NN vote on final CLS features, extracted the way `eval knn` does
    (the backbone's own size and normalisation; resize to crop / 0.875, centre crop)."""
    model, info = load_backbone(spec)
    crop = int(info["eval_img_size"])
    transform = EvalTransform(round(crop / 0.875), crop, info["mean"], info["std"])
    train_set, test_set = (extract_features(model, open_labeled_dataset(root, split), transform, n_last_blocks=1)
                           for split in ("Training", "Testing"))
    n_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1
    probs = knn_probabilities(train_set.knn_input(), train_set.labels, test_set.knn_input(), ks=[10],
                              n_classes=n_classes)[10]
    return float((probs.argmax(1) == test_set.labels).float().mean())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_pretraining_beats_random_init_on_toy_shapes(tmp_path):
    data, run = tmp_path / "toy", tmp_path / "run"
    write_toy_set(data, n_train=64, n_test=32)
    cfg = load_config(configs_dir() / "train" / "demo_cpu.yaml", [
        f"data.path={data}", "data.kind=kaggle", "data.num_workers=0", "logging.progress_bar=false",
        "crops.global_crops_size=32", "crops.local_crops_size=16",
        "train.max_iterations=120", "train.official_epoch_length=12",
        "checkpoint.period_iterations=1000", "evaluation.eval_period_iterations=1000", *RECIPE_INIT])
    with torch.random.fork_rng(devices=[]):
        train(cfg, run)

    pretrained, random_init = knn_accuracy(str(run), data), knn_accuracy(f"random:{run}", data)
    print(f"k-NN accuracy: pretrained {pretrained:.3f}, random init {random_init:.3f} (chance 0.25)")
    assert pretrained >= random_init + 0.10, (pretrained, random_init)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_pretraining_beats_random_init_on_real_digits(tmp_path):
    """The demo preset as shipped (its lr scaled by the recipe's sqrt rule) on real scans: scikit-learn's
    handwritten digits, 1,000 train / 797 test, the preset's 64 px crops, 150 iterations (a quarter of the demo's),
    probed as `benchmarks/learning.py` does (logistic regression and 20-NN on L2-normalised CLS features).

    Measured 2026-11-30 with crops that keep a source pixel per patch (the preset's default), pretrained vs random
    twin, linear / 20-NN: torch 2.14.1 54.8 / 57.8 vs 36.4 / 48.8; torch 2.4.1 54.2 / 59.5 vs 37.5 / 50.4, so
    gains of +17 to +18 and +9. (2026-11-29, with the recipe's crops on these 8 x 8 scans: +15 and +3 to +6.) The
    test asks for about half of each. This guards against the regression that issue 24 found: with the lr unscaled
    (0.004 at batch 32) a 300-iteration run ended at 31.6% against 48.8% for its twin (20-NN), and below it on the
    linear probe too."""
    from benchmarks.learning import make_digits, probe

    data, run = tmp_path / "digits", tmp_path / "run"
    make_digits(data)
    cfg = load_config(configs_dir() / "train" / "demo_cpu.yaml", [
        f"data.path={data}", "data.kind=kaggle", "data.num_workers=0", "logging.progress_bar=false",
        "train.max_iterations=150", "train.official_epoch_length=15",
        "checkpoint.period_iterations=1000", "evaluation.eval_period_iterations=1000"])
    with torch.random.fork_rng(devices=[]):
        train(cfg, run)

    pretrained, random_init = probe(str(run), data), probe(f"random:{run}", data)
    print(f"digits, linear / 20-NN: pretrained {pretrained['linear']:.3f} / {pretrained['knn']:.3f}, random init "
          f"{random_init['linear']:.3f} / {random_init['knn']:.3f} (chance 0.10)")
    assert pretrained["linear"] >= random_init["linear"] + 0.08, (pretrained, random_init)
    assert pretrained["knn"] >= random_init["knn"] + 0.04, (pretrained, random_init)
