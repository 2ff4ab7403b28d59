"""Does the DINO [CLS] term carry per-image signal on real images? A fast end-to-end check of its wiring.

Real scanned digits (scikit-learn's, upsampled to 32 px) are fed to the engine with two near-identical global
views per image (a shift of at most one pixel), no local crops, and DINO as the only objective (iBOT and KoLeo
off), from the demo preset. Then the teacher must become sharp and the student must follow it: teacher entropy
and DINO loss end well below log K. The control pairs view 1 of image b with view 2 of image b + 1: the teacher's
targets then say nothing about the student's image, and the teacher must stay uniform.

What it catches: targets paired with the wrong image or view, a center that cancels the per-image signal, a
teacher that does not follow the student, a loss that does not reach the head. Why near-identical views: they make
the term engage within a test's budget. With the recipe's crops of 8 x 8 digits a randomly initialised network's
CLS signal is not consistent between views and DINO goes uniform whatever the knob; with crops that keep a source
pixel per patch (the presets' default since 2026-11-30) it engages in a 600-iteration run, too slowly for a test
(docs/small_scale.md).

Measured 2026-11-29 (2 CPU cores, 200 iterations each, about 30 s in all), as fractions of log K: matched views
teacher entropy 0.58 and DINO loss 0.60; mismatched views 1.00 and 1.00. After 100 iterations matched was still
at 0.88, so the bounds below leave room for a slower start but not for an inert term.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_repro.config import configs_dir, load_config
from dinov2_repro.train.engine import train
from dinov2_repro.train.metrics import read_metrics

ITERATIONS = 200
N_PROTOTYPES = 256
BATCH = 32
SIZE = 32


def digit_images() -> torch.Tensor:
    """(1797, 3, SIZE, SIZE) float: the scikit-learn digits, bicubic-upsampled, scaled to [0, 1], normalised."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return ((images - 0.2) / 0.25).expand(-1, 3, -1, -1).contiguous()


def shifted(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by a random shift in {-1, 0, 1}^2 pixels (rolled), a near-identical view."""
    dy, dx = torch.randint(-1, 2, (2, images.shape[0]), generator=g).tolist()
    return torch.stack([torch.roll(img, shifts=(y, x), dims=(1, 2)) for img, y, x in zip(images, dy, dx)])


class TwoViewLoader:
    """``data_loader_fn``: crop-major batches of two near-identical views, no local crops, no iBOT masks.
    ``mismatched`` takes view 2 from the next image of the batch (the control)."""

    def __init__(self, mismatched: bool):
        self.images, self.mismatched = digit_images(), mismatched

    def __call__(self, cfg, rank, world, start_batch):
        n_patches = (SIZE // int(cfg.student.patch_size)) ** 2
        for it in itertools.count(start_batch):
            g = torch.Generator().manual_seed(it)
            batch = self.images[torch.randint(len(self.images), (BATCH,), generator=g)]
            view_2 = batch.roll(1, dims=0) if self.mismatched else batch
            yield {"collated_global_crops": torch.cat([shifted(batch, g), shifted(view_2, g)]),
                   "collated_local_crops": torch.empty(0, 3, 16, 16),
                   "collated_masks": torch.zeros(2 * BATCH, n_patches, dtype=torch.bool),
                   "mask_indices_list": torch.zeros(0, dtype=torch.long), "masks_weight": torch.zeros(0),
                   "n_masked_patches": torch.tensor([0]), "upperbound": 0, "n_skipped": 0, "skipped_paths": []}


def last_signals(run, n: int = 20):
    """Mean teacher entropy and DINO loss over the last n iterations, as fractions of log K."""
    records = [r for r in read_metrics(run / "metrics.jsonl") if "teacher_entropy" in r][-n:]
    log_k = math.log(N_PROTOTYPES)
    return (float(np.mean([r["teacher_entropy"] for r in records])) / log_k,
            float(np.mean([r["dino_loss"] for r in records])) / log_k)


def run_dino_only(run, mismatched: bool):
    cfg = load_config(configs_dir() / "train" / "demo_cpu.yaml", [
        "ibot.loss_weight=0", "koleo.loss_weight=0", "crops.local_crops_number=0",
        f"crops.global_crops_size={SIZE}", "crops.local_crops_size=16", f"train.batch_size_per_gpu={BATCH}",
        f"dino.head_n_prototypes={N_PROTOTYPES}", f"ibot.head_n_prototypes={N_PROTOTYPES}",
        f"train.max_iterations={ITERATIONS}", f"train.official_epoch_length={ITERATIONS // 10}",
        "logging.log_period_iterations=1", "logging.progress_bar=false", "compute.device=cpu",
        "compute.precision=fp32", "checkpoint.period_iterations=100000", "evaluation.eval_period_iterations=100000"])
    with torch.random.fork_rng(devices=[]):
        train(cfg, run, data_loader_fn=TwoViewLoader(mismatched))
    return last_signals(run)


@pytest.mark.timeout(300)
def test_dino_term_engages_on_real_digits_and_only_with_matched_views(tmp_path):
    entropy, loss = run_dino_only(tmp_path / "matched", mismatched=False)
    control_entropy, control_loss = run_dino_only(tmp_path / "mismatched", mismatched=True)
    print(f"matched views: entropy {entropy:.3f}, loss {loss:.3f}; mismatched: {control_entropy:.3f}, "
          f"{control_loss:.3f} (fractions of log K)")
    assert entropy < 0.75 and loss < 0.8, (entropy, loss)
    assert control_entropy > 0.95, control_entropy
