"""SSL meta-architecture on a tiny ViT (embed 32, depth 2, 32 px, patch 8, K = 64): construction, a training step
against a hand assembly of its parts, a few optimiser steps (student moves, teacher follows by EMA, last layer
frozen), every configuration variant, the EMA helpers and pretrained initialisation."""

import pytest
import torch
import torch.nn.functional as F

from dinov2_repro.config import load_config
from dinov2_repro.losses import KoLeoLoss
from dinov2_repro.models.factory import backbone_kwargs_from_config, build_backbone_from_config
from dinov2_repro.train.ema import assert_no_shared_storage, ema_update
from dinov2_repro.train.meta_arch import DIAGNOSTIC_KEYS, LOSS_KEYS, SSLMetaArch
from dinov2_repro.train.param_groups import apply_optim_schedule, build_optimizer, clip_grad_norms
from dinov2_repro.train.schedules import Schedules

K = 64
GLOBAL, LOCAL, PATCH = 32, 16, 8
N_PATCHES = (GLOBAL // PATCH) ** 2


def tiny_cfg(*extra):
    return load_config(None, [
        "student.arch=vit_small", f"student.patch_size={PATCH}", "student.embed_dim=32", "student.depth=2",
        "student.num_heads=2", "student.drop_path_rate=0.0", f"crops.global_crops_size={GLOBAL}",
        f"crops.local_crops_size={LOCAL}", "crops.local_crops_number=2",
        f"dino.head_n_prototypes={K}", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        f"ibot.head_n_prototypes={K}", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
        "train.official_epoch_length=10", "optim.epochs=2", "optim.warmup_epochs=0", "optim.scaling_rule=none",
        "compute.device=cpu", "compute.precision=fp32", *extra])


def make_batch(batch_size=4, n_local=2, seed=0, masked_images=(0, 3, 5)):
    """A collate-shaped batch: crop-major images, block masks on some global-crop images."""
    gen = torch.Generator().manual_seed(seed)
    n_images = 2 * batch_size
    masks = torch.zeros(n_images, N_PATCHES, dtype=torch.bool)
    for i in masked_images:
        if i < n_images:
            count = 2 + (i % 5)
            masks[i, torch.randperm(N_PATCHES, generator=gen)[:count]] = True
    per_image = 1.0 / masks.sum(-1).clamp(min=1).float()
    return {
        "collated_global_crops": torch.randn(n_images, 3, GLOBAL, GLOBAL, generator=gen),
        "collated_local_crops": torch.randn(n_local * batch_size, 3, LOCAL, LOCAL, generator=gen),
        "collated_masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": per_image.unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([int(masks.sum())]),
        "upperbound": int(masks.sum()),
        "n_skipped": 0,
        "skipped_paths": [],
    }


# ---------------------------------------------------------------------- construction
def test_construction_teacher_is_a_frozen_copy_without_drop_path():
    model = SSLMetaArch(tiny_cfg("student.drop_path_rate=0.2", "student.drop_path_uniform=true"))
    assert set(model.student.keys()) == set(model.teacher.keys()) == {"backbone", "dino_head"}
    for (name, s), (_, t) in zip(model.student.state_dict().items(), model.teacher.state_dict().items()):
        assert torch.equal(s, t), name
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    model.train()
    assert model.student.training and not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())
    assert all(b.sample_drop_ratio == 0.2 for b in model.student["backbone"].blocks)
    assert all(b.sample_drop_ratio == 0.0 for b in model.teacher["backbone"].blocks)
    assert_no_shared_storage(model.student, model.teacher)
    keys = model.state_dict().keys()
    for key in ("student.backbone.cls_token", "teacher.backbone.blocks.1.attn.qkv.weight",
                "dino_loss.centering.center", "ibot_patch_loss.centering.center"):
        assert key in keys


def test_factory_arch_table_and_overrides():
    cfg = load_config(None, ["student.arch=vit_base", "student.layerscale=0", "student.num_register_tokens=4"])
    kwargs = backbone_kwargs_from_config(cfg.student, img_size=224)
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == (768, 12, 12)
    assert kwargs["init_values"] is None and kwargs["num_register_tokens"] == 4
    assert kwargs["drop_path_rate"] == pytest.approx(0.3)
    assert backbone_kwargs_from_config(cfg.student, 224, teacher=True)["drop_path_rate"] == 0.0
    tiny = build_backbone_from_config(tiny_cfg().student, img_size=GLOBAL)
    assert tiny.embed_dim == 32 and len(tiny.blocks) == 2 and tiny.blocks[0].ls1.gamma[0].item() == pytest.approx(1e-5)


def test_untied_heads_when_requested():
    model = SSLMetaArch(tiny_cfg("ibot.separate_head=true", "ibot.head_n_prototypes=48"))
    assert set(model.teacher.keys()) == {"backbone", "dino_head", "ibot_head"}
    assert model.student["ibot_head"].last_layer.weight.shape[0] == 48
    assert model.ibot_patch_loss.center.shape == (1, 48)


# ---------------------------------------------------------------------- one step, assembled by hand
def naive_dino(student_crops, teacher_crops, temp=0.1):
    total, pairs = 0.0, 0
    for s in range(student_crops.shape[0]):
        log_p = F.log_softmax(student_crops[s] / temp, dim=-1)
        for t in range(teacher_crops.shape[0]):
            if s != t:
                total = total - (teacher_crops[t] * log_p).sum(-1).mean()
                pairs += 1
    return total / pairs


def test_training_step_equals_hand_assembly_of_its_parts():
    torch.manual_seed(0)
    # LayerScale 1 (not 1e-5) so that the CLS token depends on the image: a view mix-up must change the loss
    model = SSLMetaArch(tiny_cfg("student.layerscale=1.0"))
    model.train()
    batch = make_batch(batch_size=4, n_local=2)
    c_dino, c_ibot = torch.randn(1, K) * 0.1, torch.randn(1, K) * 0.1
    model.dino_loss.center.copy_(c_dino)
    model.ibot_patch_loss.center.copy_(c_ibot)
    temp = 0.05
    out = model.training_step(batch, teacher_temp=temp)

    g, loc, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]
    with torch.no_grad():
        t_out = model.teacher["backbone"].forward_features(g)
        t_cls = model.teacher["dino_head"](t_out["x_norm_clstoken"])  # (8, K)
        t_patch = model.teacher["dino_head"](t_out["x_norm_patchtokens"][masks])  # (M, K)
        t_cls_probs = F.softmax((t_cls - c_dino) / temp, dim=-1).view(2, 4, K)
        t_patch_probs = F.softmax((t_patch - c_ibot) / temp, dim=-1)
        s_global = model.student["backbone"].forward_features(g, masks=masks)
        s_local = model.student["backbone"].forward_features(loc)
        head = model.student["dino_head"]
        s_crops = torch.cat([head(s_global["x_norm_clstoken"]), head(s_local["x_norm_clstoken"])]).view(4, 4, K)
        s_patch = head(s_global["x_norm_patchtokens"][masks])
        expected_dino = naive_dino(s_crops, t_cls_probs)
        ce = -(t_patch_probs * F.log_softmax(s_patch / 0.1, dim=-1)).sum(-1)  # (M,)
        image_of_token = masks.nonzero()[:, 0]
        expected_ibot = sum(ce[image_of_token == i].mean() for i in image_of_token.unique()) / 8
        expected_koleo = sum(KoLeoLoss()(v) for v in s_global["x_norm_clstoken"].chunk(2))

    torch.testing.assert_close(out["dino_loss"], expected_dino, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ibot_loss"], expected_ibot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["koleo_loss"], expected_koleo, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["dino_global_crops_loss"] + out["dino_local_crops_loss"], out["dino_loss"])
    expected_total = 1.0 * expected_dino + 1.0 * expected_ibot + 0.1 * expected_koleo
    torch.testing.assert_close(out["total_loss"].detach(), expected_total, rtol=1e-4, atol=1e-4)
    # centers: one EMA update with this micro-batch's mean raw teacher logits (CLS; masked patches)
    torch.testing.assert_close(model.dino_loss.center, 0.9 * c_dino + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(model.ibot_patch_loss.center, 0.9 * c_ibot + 0.1 * t_patch.mean(0, keepdim=True))
    # diagnostics
    probs = t_cls_probs.flatten(0, 1)
    torch.testing.assert_close(out["teacher_entropy"], -(probs * probs.log()).sum(-1).mean())
    mean_p = probs.mean(0)
    torch.testing.assert_close(out["teacher_kl_to_uniform"], (mean_p * (mean_p * K).log()).sum(), atol=1e-5, rtol=1e-4)
    assert out["mask_fraction"].item() == pytest.approx(masks.sum().item() / masks.numel())
    torch.testing.assert_close(out["center_norm"], model.dino_loss.center.norm())
    normed = F.normalize(s_global["x_norm_clstoken"], dim=-1)
    torch.testing.assert_close(out["student_cls_std"], normed.std(0).mean())
    assert set(out) == set(LOSS_KEYS) | set(DIAGNOSTIC_KEYS) | {"total_loss"}
    assert out["total_loss"].requires_grad and not any(out[k].requires_grad for k in LOSS_KEYS + DIAGNOSTIC_KEYS)


# ---------------------------------------------------------------------- a few optimiser steps
def test_few_training_steps_student_moves_teacher_follows_last_layer_frozen():
    torch.manual_seed(0)
    cfg = tiny_cfg("student.drop_path_rate=0.1", "teacher.momentum_teacher=0.9", "optim.weight_decay=0.1",
                   "optim.freeze_last_layer_epochs=1", "optim.base_lr=0.01")
    model = SSLMetaArch(cfg)
    model.train()
    schedules = Schedules.from_config(cfg, global_batch=4)
    optimizer = build_optimizer(model.get_params_groups(), cfg, "cpu")
    student_start = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    for iteration in range(3):
        values = schedules.at(iteration)
        assert values["last_layer_lr"] == 0.0 and values["lr"] > 0 and values["wd"] > 0
        apply_optim_schedule(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
        optimizer.zero_grad(set_to_none=True)
        out = model.training_step(make_batch(seed=iteration), values["teacher_temp"])
        assert all(torch.isfinite(v).all() for v in out.values())
        out["total_loss"].backward()
        assert model.student["dino_head"].last_layer.weight.grad.abs().sum() > 0  # it gets gradients ...
        norms = clip_grad_norms(model.student, cfg.optim.clip_grad)
        assert set(norms) == {"backbone", "dino_head"}
        optimizer.step()
        teacher_before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
        model.update_teacher(values["momentum"])
        m = values["momentum"]
        for name, param in model.student.named_parameters():
            expected = m * teacher_before[name] + (1 - m) * param.detach()
            torch.testing.assert_close(dict(model.teacher.named_parameters())[name], expected, rtol=1e-6, atol=1e-7)
    student_now = dict(model.student.named_parameters())
    qkv = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(student_now[qkv], student_start[qkv])
    assert not torch.equal(student_now["dino_head.mlp.0.weight"], student_start["dino_head.mlp.0.weight"])
    # ... but lr 0 (and therefore no decoupled weight decay) keeps it exactly in place, in both networks
    assert torch.equal(student_now["dino_head.last_layer.weight"], student_start["dino_head.last_layer.weight"])
    assert torch.equal(model.teacher["dino_head"].last_layer.weight, student_start["dino_head.last_layer.weight"])
    teacher_qkv = model.teacher["backbone"].blocks[0].attn.qkv.weight
    assert not torch.equal(teacher_qkv, student_start["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(teacher_qkv, student_now["backbone.blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------- variants
@pytest.mark.parametrize("overrides,n_local,expect_keys_nonzero", [
    ((), 0, ("dino_loss", "ibot_loss", "koleo_loss")),  # no local crops: the 2 cross pairs only
    (("ibot.loss_weight=0",), 2, ("dino_loss", "koleo_loss")),
    (("koleo.loss_weight=0",), 2, ("dino_loss", "ibot_loss")),
    (("ibot.separate_head=true",), 2, ("dino_loss", "ibot_loss", "koleo_loss")),
    (("train.centering=sinkhorn_knopp",), 2, ("dino_loss", "ibot_loss", "koleo_loss")),
    (("train.centering=sinkhorn_knopp", "ibot.separate_head=true", "student.num_register_tokens=2"), 1,
     ("dino_loss", "ibot_loss", "koleo_loss")),
])
def test_variants_run_and_backpropagate(overrides, n_local, expect_keys_nonzero):
    model = SSLMetaArch(tiny_cfg(*overrides))
    model.train()
    out = model.training_step(make_batch(n_local=n_local), teacher_temp=0.07)
    for key in expect_keys_nonzero:
        assert torch.isfinite(out[key]) and out[key].item() > 0, key
    for key in set(LOSS_KEYS) - set(expect_keys_nonzero) - {"dino_global_crops_loss", "dino_local_crops_loss"}:
        assert out[key].item() == 0.0, key  # a weight of 0 skips (and reports 0)
    if n_local == 0:
        assert out["dino_local_crops_loss"].item() == 0.0
        torch.testing.assert_close(out["dino_global_crops_loss"], out["dino_loss"])
    out["total_loss"].backward()
    for name, module in model.student.items():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
    if "ibot.loss_weight=0" in overrides:
        assert out["mask_fraction"].item() == 0.0  # without iBOT the student sees unmasked crops
        assert model.student["backbone"].mask_token.grad is None
    else:
        assert model.student["backbone"].mask_token.grad.abs().sum() > 0
    if "train.centering=sinkhorn_knopp" in overrides:
        assert model.dino_loss.center.abs().sum() == 0  # SK does not touch the center


def test_step_with_no_masked_image_and_batch_of_one():
    model = SSLMetaArch(tiny_cfg())
    model.train()
    out = model.training_step(make_batch(batch_size=1, n_local=2, masked_images=()), teacher_temp=0.07)
    assert out["ibot_loss"].item() == 0.0 and out["koleo_loss"].item() == 0.0  # KoLeo of one sample per view
    assert torch.isfinite(out["total_loss"])
    out["total_loss"].backward()


def test_bad_batch_shapes_name_the_key():
    model = SSLMetaArch(tiny_cfg())
    batch = make_batch(batch_size=4)
    batch["collated_local_crops"] = batch["collated_local_crops"][:5]
    with pytest.raises(ValueError, match="collated_local_crops"):
        model.training_step(batch, 0.07)


def test_params_groups_cover_student_only():
    model = SSLMetaArch(tiny_cfg("ibot.separate_head=true", "optim.layerwise_decay=0.9"))
    groups = model.get_params_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.student.parameters())
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1 and sorted(last[0]["names"]) == [  # the prototypes V and their gains g
        f"student.{head}.last_layer.{p}" for head in ("dino_head", "ibot_head") for p in ("weight", "weight_g")]
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["student.backbone.blocks.0.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.9 ** 2)
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * 0.9 ** 3)


# ---------------------------------------------------------------------- EMA helpers
def test_ema_momentum_zero_copies_and_one_keeps():
    model = SSLMetaArch(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    ema_update(model.student, model.teacher, momentum=1.0)
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), n
    ema_update(model.student, model.teacher, momentum=0.0)
    for (n, s), (_, t) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(s, t), n
    assert_no_shared_storage(model.student, model.teacher)  # equal values, separate memory
    with pytest.raises(ValueError):
        ema_update(model.student, model.teacher, momentum=1.5)


def test_assert_no_shared_storage_detects_aliasing():
    model = SSLMetaArch(tiny_cfg())
    model.teacher["backbone"].cls_token = model.student["backbone"].cls_token  # an aliasing bug
    with pytest.raises(AssertionError, match="cls_token"):
        assert_no_shared_storage(model.student, model.teacher)


# ---------------------------------------------------------------------- pretrained initialisation
def test_pretrained_weights_initialise_student_and_teacher(tmp_path):
    source = build_backbone_from_config(tiny_cfg().student, img_size=48)  # pos_embed of another resolution
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = SSLMetaArch(tiny_cfg(f"student.pretrained_weights={path}"))
    for name, value in source.state_dict().items():
        assert torch.equal(model.student["backbone"].state_dict()[name], value), name
        assert torch.equal(model.teacher["backbone"].state_dict()[name], value), name
    out = model.training_step(make_batch(), teacher_temp=0.07)  # 32 px crops on a 48 px pos_embed
    assert torch.isfinite(out["total_loss"])
    torch.save({"model": {f"teacher.backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ckpt.pth")
    model2 = SSLMetaArch(tiny_cfg(f"student.pretrained_weights={tmp_path / 'ckpt.pth'}"))
    assert torch.equal(model2.student["backbone"].pos_embed, source.pos_embed)
    with pytest.raises(ValueError, match="pretrained_weights"):
        SSLMetaArch(tiny_cfg(f"student.pretrained_weights={path}", "student.num_register_tokens=1"))


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
@pytest.mark.gpu
def test_cuda_bf16_autocast_step_with_fused_adamw():
    cfg = tiny_cfg("compute.device=cuda", "compute.precision=bf16", "compute.fused_optimizer=true",
                   "train.centering=sinkhorn_knopp")
    model = SSLMetaArch(cfg).cuda()
    model.train()
    optimizer = build_optimizer(model.get_params_groups(), cfg, "cuda")
    assert optimizer.defaults.get("fused") is True
    apply_optim_schedule(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    batch = make_batch(batch_size=8, masked_images=(0, 1, 2, 3, 9))
    batch["collated_global_crops"][8] = batch["collated_global_crops"][9]  # duplicate view for KoLeo
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.training_step(batch, teacher_temp=0.04)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["dino_loss"].dtype == torch.float32 and out["koleo_loss"].dtype == torch.float32
    out["total_loss"].backward()
    clip_grad_norms(model.student, 3.0)
    optimizer.step()
    model.update_teacher(0.99)
    assert all(torch.isfinite(p).all() for p in model.teacher.parameters())


def test_teacher_head_batchnorm_uses_batch_statistics_while_training():
    """With head_use_bn the EMA never moves the teacher's running statistics (buffers), so in eval mode its
    BatchNorm would stay the identity of its init. While training it normalises with the batch's statistics
    (DINO v1's teacher): per channel, mean 0 and variance 1 over the batch, unlike the input."""
    model = SSLMetaArch(tiny_cfg("dino.head_use_bn=true"))
    model.train()
    head = model.teacher["dino_head"]
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(m.training for m in norms)
    assert not model.teacher["backbone"].training
    seen = {}
    norms[0].register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        head(torch.randn(16, 32) * 3.0 + 2.0)
    assert seen["inp"].mean(0).abs().max() > 0.1  # the layer has work to do
    torch.testing.assert_close(seen["out"].mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["out"].var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
    model.eval()
    assert all(not m.training for m in model.teacher.modules())
