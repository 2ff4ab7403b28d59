"""Schedules (end points, warmups, purity), parameter groups (layer-wise lr decay, weight-decay membership,
last-layer flag), AdamW construction and per-module gradient clipping."""

import math

import pytest
import torch
from torch import nn

from dinov2_repro.config import ConfigError, load_config
from dinov2_repro.models.dino_head import DINOHead
from dinov2_repro.models.vision_transformer import DinoVisionTransformer
from dinov2_repro.train.param_groups import (
    apply_optim_schedule,
    build_optimizer,
    clip_grad_norms,
    fuse_params_groups,
    get_params_groups_with_decay,
)
from dinov2_repro.train.schedules import Schedules, scaled_lr, warmup_cosine

EPOCH = 10


def schedule_config(*extra):
    return load_config(None, [
        f"train.official_epoch_length={EPOCH}", "optim.epochs=10", "optim.warmup_epochs=2", "optim.base_lr=0.004",
        "optim.min_lr=1e-6", "optim.freeze_last_layer_epochs=1", "optim.scaling_rule=sqrt_wrt_1024",
        "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "teacher.momentum_teacher=0.992",
        "teacher.final_momentum_teacher=1.0", "teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07",
        "teacher.warmup_teacher_temp_epochs=3", *extra])


def test_schedule_end_points_and_warmups():
    sched = Schedules.from_config(schedule_config(), global_batch=256)
    total, warmup = 10 * EPOCH, 2 * EPOCH
    peak = 0.004 * math.sqrt(256 / 1024)
    assert sched.total_iterations == total
    first, after_warmup, last = sched.at(0), sched.at(warmup), sched.at(total)
    assert first["lr"] == 0.0
    assert sched.at(warmup - 1)["lr"] == pytest.approx(peak)  # linspace: the last warmup point is the peak
    assert after_warmup["lr"] == pytest.approx(peak)
    assert sched.at(warmup // 2)["lr"] == pytest.approx(peak * (warmup // 2) / (warmup - 1))
    # half-way through the cosine the lr is the mean of peak and min
    assert sched.at(warmup + (total - warmup) // 2)["lr"] == pytest.approx((peak + 1e-6) / 2)
    assert last["lr"] == pytest.approx(1e-6) and sched.at(total + 50)["lr"] == pytest.approx(1e-6)
    lrs = [sched.at(i)["lr"] for i in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing after the warmup
    # weight decay and teacher momentum: cosine between their end points
    assert first["wd"] == pytest.approx(0.04) and last["wd"] == pytest.approx(0.4)
    assert sched.at(total // 2)["wd"] == pytest.approx(0.22)
    assert first["momentum"] == pytest.approx(0.992) and last["momentum"] == pytest.approx(1.0)
    # teacher temperature: linear 0.04 -> 0.07 over 3 epochs, then constant
    assert first["teacher_temp"] == pytest.approx(0.04)
    assert sched.at(3 * EPOCH - 1)["teacher_temp"] == pytest.approx(0.07)
    assert sched.at(15)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 15 / (3 * EPOCH - 1))
    assert sched.at(3 * EPOCH)["teacher_temp"] == pytest.approx(0.07)
    assert sched.at(total)["teacher_temp"] == pytest.approx(0.07)
    # last layer frozen for the first epoch, then the ordinary lr
    assert all(sched.at(i)["last_layer_lr"] == 0.0 for i in range(EPOCH))
    assert sched.at(EPOCH)["last_layer_lr"] == pytest.approx(sched.at(EPOCH)["lr"]) and sched.at(EPOCH)["lr"] > 0


def test_schedule_is_a_pure_function_of_the_iteration():
    forward = Schedules.from_config(schedule_config(), 512)
    backward = Schedules.from_config(schedule_config(), 512)  # a "resumed" run
    iterations = list(range(0, 120, 7))
    values = [forward.at(i) for i in iterations]
    assert [backward.at(i) for i in reversed(iterations)] == list(reversed(values))
    assert forward.at(33) == forward.at(33)


def test_lr_scaling_rules():
    assert scaled_lr(0.004, 2048, "sqrt_wrt_1024") == pytest.approx(0.004 * math.sqrt(2))
    assert scaled_lr(0.004, 512, "linear_wrt_256") == pytest.approx(0.008)
    assert scaled_lr(0.004, 512, "none") == pytest.approx(0.004)
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(0.004, 512, "cubic")
    sched = Schedules.from_config(schedule_config("optim.scaling_rule=linear_wrt_256"), global_batch=64)
    assert sched.at(2 * EPOCH)["lr"] == pytest.approx(0.004 * 64 / 256)


def test_train_iterations_scales_every_epoch_based_schedule_to_the_run():
    # 10 epochs in 20 iterations: an epoch is 2 iterations, so warm-up 2 epochs = 4, freeze 1 = 2, teacher 3 = 6.
    sched = Schedules.from_config(schedule_config("train.iterations=20"), global_batch=1024)
    assert (sched.total_iterations, sched.stop_iteration) == (20, 20)
    assert (sched.lr_warmup_iterations, sched.freeze_last_layer_iterations,
            sched.teacher_temp_warmup_iterations) == (4, 2, 6)
    lrs = [sched.at(i)["lr"] for i in range(21)]
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.004) and lrs[20] == pytest.approx(1e-6)
    assert lrs[:4] == sorted(lrs[:4]) and lrs[4:] == sorted(lrs[4:], reverse=True)  # warm up, then decay
    assert [sched.at(i)["last_layer_lr"] > 0 for i in range(4)] == [False, False, True, True]
    assert sched.at(5)["teacher_temp"] == pytest.approx(0.07) and sched.at(2)["teacher_temp"] < 0.07
    # fractional epochs round half up: 5 iterations, epoch 0.5 -> warm-up 1, freeze 1 (0.5), teacher 2 (1.5)
    short = Schedules.from_config(schedule_config("train.iterations=5"), global_batch=1024)
    assert (short.lr_warmup_iterations, short.freeze_last_layer_iterations,
            short.teacher_temp_warmup_iterations) == (1, 1, 2)
    assert all(math.isfinite(short.at(i)["lr"]) for i in range(6))


def test_max_iterations_cuts_the_run_and_leaves_the_schedules_alone():
    whole = Schedules.from_config(schedule_config(), global_batch=1024)
    cut = Schedules.from_config(schedule_config("train.max_iterations=5"), global_batch=1024)
    assert (cut.total_iterations, cut.stop_iteration) == (10 * EPOCH, 5)
    assert [cut.at(i) for i in range(5)] == [whole.at(i) for i in range(5)]
    assert cut.at(4)["lr"] < cut.peak_lr / 2  # still warming up where it stops: what the start-up warning says
    with pytest.raises(ConfigError, match=r"train\.max_iterations' = 101: stops the run after the end of its "
                                          r"100-iteration schedule; .*train\.iterations=101"):
        schedule_config("train.max_iterations=101")
    assert warmup_cosine(0, 1.0, 0.0, total_iters=3, warmup_iters=1) == 0.0  # linspace(0, 1, 1) == [0]
    with pytest.raises(ValueError):
        warmup_cosine(-1, 1.0, 0.0, 10)


# ---------------------------------------------------------------------- parameter groups
def tiny_vit(**kw):
    return DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=1e-5,
                                 num_register_tokens=1, **kw)


def test_param_group_lr_multipliers_and_weight_decay_membership():
    decay, depth = 0.5, 2
    backbone = tiny_vit()
    groups = {g["name"]: g for g in get_params_groups_with_decay(backbone, decay, patch_embed_lr_mult=0.2)}
    assert set(groups) == {n for n, _ in backbone.named_parameters()}
    for name, group in groups.items():
        if name.startswith("patch_embed"):
            expected = 0.2 * decay ** (depth + 1)
        elif name in ("pos_embed", "cls_token", "mask_token", "register_tokens"):
            expected = decay ** (depth + 1)  # layer 0
        elif name.startswith("blocks.0."):
            expected = decay ** depth  # layer 1
        elif name.startswith("blocks.1."):
            expected = decay ** 1  # layer 2
        else:
            assert name.startswith("norm."), name
            expected = 1.0
        assert group["lr_multiplier"] == pytest.approx(expected), name
        no_wd = name.endswith(".bias") or ".norm" in name or name.startswith("norm") or name.endswith(".gamma")
        assert group["wd_multiplier"] == (0.0 if no_wd else 1.0), name
        assert group["is_last_layer"] is False
    # spot checks written out
    assert groups["blocks.0.ls1.gamma"]["wd_multiplier"] == 0.0
    assert groups["blocks.1.norm2.weight"]["wd_multiplier"] == 0.0
    assert groups["blocks.1.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert groups["pos_embed"]["wd_multiplier"] == 1.0  # the reference keeps weight decay on tokens
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.125)

    head = DINOHead(32, 20, hidden_dim=16, bottleneck_dim=8)
    head_groups = {g["name"]: g for g in get_params_groups_with_decay(head, decay, 0.2, prefix="dino_head.")}
    assert all(g["lr_multiplier"] == 1.0 for g in head_groups.values())
    assert [n for n, g in head_groups.items() if g["is_last_layer"]] == ["dino_head.last_layer.weight",
                                                                        "dino_head.last_layer.weight_g"]
    assert head_groups["dino_head.last_layer.weight"]["wd_multiplier"] == 1.0
    assert head_groups["dino_head.last_layer.weight_g"]["wd_multiplier"] == 1.0  # as the published "weight_g"
    assert head_groups["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0


def test_fused_groups_cover_every_parameter_once():
    backbone, head = tiny_vit(), DINOHead(32, 20, hidden_dim=16, bottleneck_dim=8)
    per_param = (get_params_groups_with_decay(backbone, 0.9, 0.2, prefix="backbone.")
                 + get_params_groups_with_decay(head, 0.9, 0.2, prefix="dino_head."))
    fused = fuse_params_groups(per_param)
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused]
    assert len(keys) == len(set(keys))
    ids = [id(p) for g in fused for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in list(backbone.parameters()) + list(head.parameters()))
    # 4 lr levels in the backbone (x2 wd settings, patch embed separately) + head + last layer
    assert sum(g["is_last_layer"] for g in fused) == 1


def test_optimizer_schedule_application_and_frozen_last_layer():
    cfg = schedule_config("compute.fused_optimizer=true")
    head = DINOHead(8, 6, hidden_dim=8, bottleneck_dim=4)
    optimizer = build_optimizer(fuse_params_groups(get_params_groups_with_decay(head, 1.0, 1.0)), cfg, "cpu")
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    apply_optim_schedule(optimizer, lr=0.1, wd=0.3, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.0 if group["is_last_layer"] else 0.1 * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.3 * group["wd_multiplier"])
    before = head.last_layer.weight.detach().clone()
    mlp_before = head.mlp[0].weight.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
    # lr 0 also means no decoupled weight decay (p *= 1 - lr * wd): the frozen layer does not move at all
    assert torch.equal(head.last_layer.weight, before)
    assert not torch.equal(head.mlp[0].weight, mlp_before)


def test_clip_grad_norms_per_module():
    modules = {"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(3, 1, bias=False)}
    modules["a"].weight.grad = torch.full((4, 4), 2.0)  # norm 8
    modules["b"].weight.grad = torch.full((1, 3), 0.1)  # norm ~0.17
    norms = clip_grad_norms(modules, max_norm=1.0)
    assert norms["a"].item() == pytest.approx(8.0) and norms["b"].item() == pytest.approx(math.sqrt(0.03))
    assert modules["a"].weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)  # clipped on its own
    torch.testing.assert_close(modules["b"].weight.grad, torch.full((1, 3), 0.1))  # untouched
    modules["a"].weight.grad = torch.full((4, 4), 2.0)
    assert clip_grad_norms(modules, max_norm=0.0)["a"].item() == pytest.approx(8.0)  # 0: measure only
    torch.testing.assert_close(modules["a"].weight.grad, torch.full((4, 4), 2.0))
