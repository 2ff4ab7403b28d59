"""Shared helpers of the engine tests (tiny config, fixed in-memory batches) and tests of the engine's small parts.

The fixed loader makes one *global* micro-batch per step index from a seed and gives rank r of W the images
[r*B, (r+1)*B) of it, recomputing the per-rank mask bookkeeping exactly as the SSL collate defines it. So a
single process with batch W*B and W processes with batch B see the same images, the same crops and the same
iBOT masks: what multi-process equivalence tests need, independent of the data pipeline's sharding.
"""

import itertools
import json
import math

import pytest
import torch

from dinov2_repro.config import ConfigError, load_config

TINY = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=8", "student.drop_path_rate=0.0",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=4", "train.official_epoch_length=2", "train.max_iterations=4",
    "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "optim.scaling_rule=none", "optim.base_lr=0.002",
    "teacher.warmup_teacher_temp_epochs=1",
    "data.kind=synthetic", "data.num_workers=0", "data.pin_memory=false", "data.persistent_workers=false",
    "compute.device=cpu", "compute.precision=fp32",
    "logging.log_period_iterations=1", "logging.progress_bar=false",
    "checkpoint.period_iterations=2", "checkpoint.keep_last=5", "evaluation.eval_period_iterations=100",
]


def tiny_cfg(*overrides):
    return load_config(None, TINY + list(overrides))


@pytest.fixture(scope="session")
def synthetic_mri(tmp_path_factory):
    """A tiny synthetic brain-MRI folder (Kaggle layout, 4 x 4 training images of 64 px), made once."""
    from dinov2_repro.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic_mri")
    generate_dataset(root, n_per_class=4, seed=0, size=64)
    return root


def real_data(root) -> list:
    """Overrides that read ``root`` through the real SSL data pipeline (dataset, sampler, augmentation)."""
    return [f"data.path={root}", "data.kind=kaggle", "data.split=Training"]


def global_micro_batch(step: int, n_images: int, cfg, seed: int = 1234) -> dict:
    """Deterministic global micro-batch number ``step`` with ``n_images`` images (crop-major layout)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    size_g, size_l = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_local = int(cfg.crops.local_crops_number)
    n_patches = (size_g // int(cfg.student.patch_size)) ** 2
    masked_image = torch.rand(2 * n_images, 1, generator=g) < 0.5
    masks = (torch.rand(2 * n_images, n_patches, generator=g) < 0.4) & masked_image
    return {
        "collated_global_crops": torch.randn(2 * n_images, 3, size_g, size_g, generator=g),
        "collated_local_crops": torch.randn(n_local * n_images, 3, size_l, size_l, generator=g),
        "collated_masks": masks,
    }


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global micro-batch, with the collate's derived fields recomputed."""
    from dinov2_repro.losses import masks_weight_from_masks

    n_global = batch["collated_global_crops"].shape[0] // 2
    per_rank = n_global // world
    idx = torch.arange(rank * per_rank, (rank + 1) * per_rank)

    def crop_major(tensor, n_crops):
        return torch.cat([tensor[c * n_global + idx] for c in range(n_crops)])

    n_local = batch["collated_local_crops"].shape[0] // n_global
    masks = crop_major(batch["collated_masks"], 2)
    return {
        "collated_global_crops": crop_major(batch["collated_global_crops"], 2),
        "collated_local_crops": crop_major(batch["collated_local_crops"], n_local),
        "collated_masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": masks_weight_from_masks(masks),
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "upperbound": int(masks.numel()),
        "n_skipped": 0,
        "skipped_paths": [],
    }


class FixedLoader:
    """``data_loader_fn`` for `train`: iteration i uses global batch i (batch_size_per_gpu x world x
    grad_accum_steps images); micro-batch j of rank r is its chunk number j * world + r.

    Runs with different world sizes or accumulation but the same global batch thus see the same images; the
    position after a resume is derived from ``start_batch`` (loader batches consumed) like the real sampler's.
    """

    def __init__(self, seed: int = 1234, skipped_every: int = 0):
        self.seed, self.skipped_every = seed, skipped_every

    def __call__(self, cfg, rank, world, start_batch):
        k = int(cfg.train.grad_accum_steps)
        assert start_batch % k == 0, "the engine resumes at whole iterations"
        n_global = int(cfg.train.batch_size_per_gpu) * world * k
        for it in itertools.count(start_batch // k):
            batch = global_micro_batch(it, n_global, cfg, self.seed)
            for j in range(k):
                part = rank_slice(batch, j * world + rank, k * world)
                if self.skipped_every and it % self.skipped_every == 0:
                    part["n_skipped"], part["skipped_paths"] = 1, [f"/data/broken_{it}_{j}_{rank}.png"]
                yield part


# ------------------------------------------------------------------------------------------------ unit tests
def test_rank_slices_reassemble_the_global_batch():
    cfg = tiny_cfg()
    batch = global_micro_batch(0, 8, cfg)
    parts = [rank_slice(batch, r, 2) for r in range(2)]
    # crop 0 of rank 0 = images 0..3 of crop 0; crop 1 of rank 1 = images 4..7 of crop 1
    assert torch.equal(parts[0]["collated_global_crops"][:4], batch["collated_global_crops"][:4])
    assert torch.equal(parts[1]["collated_global_crops"][4:], batch["collated_global_crops"][12:])
    assert torch.equal(parts[1]["collated_local_crops"][4:8], batch["collated_local_crops"][12:16])
    total_masked = sum(int(p["n_masked_patches"]) for p in parts)
    assert total_masked == int(batch["collated_masks"].sum())
    for part in parts:  # each masked image's weights sum to 1
        n_patches = part["collated_masks"].shape[1]
        per_image = torch.zeros(8).index_add_(0, part["mask_indices_list"] // n_patches, part["masks_weight"])
        has_mask = part["collated_masks"].any(1)
        assert torch.allclose(per_image[has_mask], torch.ones(int(has_mask.sum())))


def test_collapse_monitor_patience_and_both_kinds():
    from dinov2_repro.train.guards import CollapseMonitor

    monitor = CollapseMonitor(n_prototypes=64, patience=3, embed_dim=100)
    log_k = math.log(64)
    # A sharp teacher with spread-out student features is healthy.
    assert monitor.update(0, 0.0, 0.1) is None and monitor.streak == 0
    # One prototype + coinciding features: warned once the streak reaches the patience, once per streak.
    assert monitor.update(1, 0.01, 1e-4) is None
    assert monitor.update(2, 0.01, 1e-4) is None
    message = monitor.update(3, 0.01, 1e-4)
    assert message and "iteration 3" in message and "one prototype" in message
    assert "train.centering=sinkhorn_knopp" in message  # the advice names the knob to turn
    assert monitor.update(4, 0.01, 1e-4) is None
    assert monitor.update(5, 0.5 * log_k, 0.5) is None and monitor.streak == 0  # recovered: re-armed
    # A uniform teacher is a collapse even with spread-out features (the demo's case): the targets say nothing.
    assert monitor.update(6, log_k * 0.999, 0.5) is None and monitor.streak == 1
    assert monitor.update(7, log_k * 0.999, 0.5) is None
    message = monitor.update(8, log_k * 0.999, 0.5)
    assert message and "uniform" in message and "iteration 8" in message
    assert "optim.scaling_rule=sqrt_wrt_1024" in message and "teacher.teacher_temp" in message
    # Just below the uniform threshold is not flagged.
    assert monitor.update(9, 0.97 * log_k, 0.5) is None and monitor.streak == 0


def test_collapse_monitor_sees_one_prototype_for_every_image_behind_spread_features():
    """Sharp per-image targets are healthy when images pick different prototypes (the batch-mean target is
    spread: KL to uniform well below log K) and a collapse when they all pick the same one (KL = log K), even
    though KoLeo keeps the student CLS tokens apart (std 0.5)."""
    from dinov2_repro.train.guards import CollapseMonitor

    log_k = math.log(1024)
    diverse, one_target = log_k - math.log(32), log_k - 1e-3  # 32 images on 32 prototypes / all on one
    monitor = CollapseMonitor(n_prototypes=1024, patience=2, embed_dim=100)
    assert monitor.update(0, 0.01, 0.5, diverse) is None and monitor.update(1, 0.01, 0.5, diverse) is None
    assert monitor.streak == 0
    assert monitor.update(2, 0.01, 0.5, one_target) is None and monitor.streak == 1
    message = monitor.update(3, 0.01, 0.5, one_target)
    assert message and "one prototype" in message and "batch-mean target's entropy 0.001" in message
    assert "dino.center_momentum" in message
    # A teacher that is not sharp is not a one-prototype collapse, whatever the batch mean says.
    assert monitor.update(4, 0.5 * log_k, 0.5, one_target) is None and monitor.streak == 0
    # One image per batch: its two crops are the whole batch and rightly share a target.
    single = CollapseMonitor(n_prototypes=1024, patience=1, embed_dim=100, images_per_batch=1)
    assert single.update(0, 0.01, 0.5, one_target) is None and single.streak == 0


def test_teacher_lag_warning_compares_the_ema_horizon_with_the_run():
    from dinov2_repro.train.guards import teacher_lag_warning

    # 1 / (1 - 0.996) = 250 iterations, 42 % of 600: the screen that lost 7-10 points; suggest 1 - 10 / 600
    message = teacher_lag_warning(0.996, 600)
    assert "about 250 iterations" in message and "42% of this 600-iteration schedule" in message
    assert ") and 500 by mid-run" in message  # the cosine to 1 puts the momentum at 0.998 half-way
    assert ") and 250 by mid-run" in teacher_lag_warning(0.996, 600, final_momentum=0.996)  # a constant momentum
    assert ") and 333 by mid-run" in teacher_lag_warning(0.996, 600, final_momentum=0.998)  # 1 / (1 - 0.997)
    assert "teacher.momentum_teacher=0.983 here" in message
    assert teacher_lag_warning(0.98, 600) is None and teacher_lag_warning(0.99, 600) is None
    assert teacher_lag_warning(0.99, 400) is None  # a horizon of 100 is exactly a quarter: not yet a lag
    assert "25% of this 399-iteration" in teacher_lag_warning(0.99, 399)
    assert teacher_lag_warning(0.999, 30000) is None  # the 1-GPU presets' long runs
    assert "teacher.momentum_teacher=0.995 here" in teacher_lag_warning(0.999, 2000)  # ...cut to 2,000
    assert "never updates the teacher" in teacher_lag_warning(1.0, 600)
    frozen = teacher_lag_warning(1.0, 600, final_momentum=0.99)  # the cosine does bring it below 1 later
    assert "freezes the teacher at the start" in frozen and "final_momentum_teacher=0.99 " in frozen
    assert teacher_lag_warning(0.992, 99) is None  # smoke-test runs: a tenth of them would copy the student
    assert "teacher.momentum_teacher=0.9 here" in teacher_lag_warning(0.992, 100)


def test_cpu_fsdp_on_a_torch_without_it_names_the_key_and_the_version(monkeypatch):
    from dinov2_repro.train import guards

    monkeypatch.setattr(guards, "torch_version", lambda: (2, 6))
    with pytest.raises(ConfigError, match=r"compute\.parallelism = 'fsdp' on CPU needs torch >= 2\.7.*ddp"):
        guards.check_setup(tiny_cfg("compute.parallelism=fsdp"), "cpu", 2, "torchrun")
    guards.check_setup(tiny_cfg("compute.parallelism=fsdp"), "cuda", 2, "torchrun")  # GPUs are not affected


@pytest.mark.parametrize("overrides, device, world, source, key", [
    (["compute.precision=fp16"], "cpu", 1, "single", "compute.precision"),
    (["compute.parallelism=fsdp"], "cpu", 1, "single", "compute.parallelism"),
    (["compute.parallelism=ddp"], "cpu", 1, "single", "compute.parallelism"),
    (["compute.parallelism=none"], "cpu", 2, "torchrun", "compute.parallelism"),
    (["train.batch_size_per_gpu=1"], "cpu", 1, "single", "train.batch_size_per_gpu"),
    (["student.attn_backend=xformers"], "cpu", 1, "single", "student.attn_backend"),
    (["compute.parallelism=fsdp", "compute.precision=bf16", "compute.param_dtype=fp16"], "cpu", 2, "torchrun",
     "compute.param_dtype"),
])
def test_bad_combinations_name_the_key(overrides, device, world, source, key):
    from dinov2_repro.train.guards import check_setup

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_setup(tiny_cfg(*overrides), device, world, source)


def test_good_combinations_pass(monkeypatch):
    from dinov2_repro.train import guards
    from dinov2_repro.train.guards import check_setup

    monkeypatch.setattr(guards, "torch_version", lambda: guards.CPU_FSDP_MIN_TORCH)
    check_setup(tiny_cfg("train.batch_size_per_gpu=1", "koleo.loss_weight=0"), "cpu", 1, "single")
    check_setup(tiny_cfg("compute.parallelism=fsdp", "compute.precision=bf16"), "cpu", 2, "torchrun")
    check_setup(tiny_cfg("compute.parallelism=ddp"), "cpu", 2, "slurm")


def test_loss_curves_and_metrics_reader(tmp_path):
    import json

    from dinov2_repro.train.metrics import plot_loss_curves, read_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "total_loss": 5.0 - i, "dino_loss": 2.0, "lr": 0.1 * i}) for i in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n{\"iteration\": 4, \"tot")  # torn last line of a killed run
    assert [r["iteration"] for r in read_metrics(path)] == [1, 2, 3]
    png = plot_loss_curves(path, tmp_path / "loss_curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activation_checkpointing_recomputes_the_same_gradients():
    # Drop path is random: the recomputation must replay the same masks (RNG state preserved).
    from dinov2_repro.distributed.compile import apply_activation_checkpointing
    from dinov2_repro.train.meta_arch import SSLMetaArch

    cfg = tiny_cfg("student.drop_path_rate=0.3")
    batch = rank_slice(global_micro_batch(0, 4, cfg), 0, 1)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = SSLMetaArch(cfg)
        block, calls = model.student["backbone"].blocks[0], []
        plain_forward = block.forward
        block.forward = lambda *args, **kwargs: (calls.append(1), plain_forward(*args, **kwargs))[1]
        if checkpointed:
            assert apply_activation_checkpointing(model.student["backbone"]) == 2
        keys_before = set(model.state_dict())
        torch.manual_seed(1)
        model.training_step(batch, teacher_temp=0.04)["total_loss"].backward()
        assert len(calls) == (2 if checkpointed else 1)  # recomputed in the backward pass
        grads.append({n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None})
        assert set(model.state_dict()) == keys_before  # no wrapper prefixes in checkpoint keys
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_optional_backends_are_skipped_or_offline(tmp_path, caplog):
    import importlib.util
    import logging

    from dinov2_repro.train.metrics import MetricsLogger, read_metrics

    cfg = tiny_cfg("logging.tensorboard=true", "logging.wandb=true", "logging.progress_bar=true")
    with caplog.at_level(logging.WARNING, logger="dinov2_repro.train"):
        logger = MetricsLogger(tmp_path, cfg, is_main=True, start_iter=0, total_iters=3)
        for it in (1, 2):
            logger.step(it, {"loss": 1.0 / it, "lr": 0.1})
            logger.log({"iteration": it, "total_loss": 1.0 / it, "lr": 0.1, "bad": float("nan")})
        logger.close()
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in caplog.text
    else:
        assert (tmp_path / "tensorboard").is_dir()
    if importlib.util.find_spec("wandb") is not None:  # offline by default: a local run folder, no network
        assert list((tmp_path / "wandb").glob("offline-run-*"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2] and records[0]["bad"] == "nan"
    # A resumed run drops the records after its checkpoint (they are recomputed).
    MetricsLogger(tmp_path, tiny_cfg(), is_main=True, start_iter=1, total_iters=3).close()
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_a_cut_last_metrics_line_is_dropped_with_a_warning_before_appending(tmp_path, caplog):
    import logging

    from dinov2_repro.train.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "total_loss": 2.0}\n{"iteration": 2, "total_lo')  # power cut mid-write
    with caplog.at_level(logging.WARNING, logger="dinov2_repro.train"):
        logger = MetricsLogger(tmp_path, tiny_cfg("logging.progress_bar=false"), is_main=True, start_iter=2,
                               total_iters=3)
    logger.log({"iteration": 3, "total_loss": 1.5})
    logger.close()
    assert "metrics.jsonl: dropping 1 unreadable line(s)" in caplog.text
    # Every line parses and the new record was not glued onto the torn one.
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 3]
