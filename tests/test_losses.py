"""Objectives: hand-computed DINO / iBOT / KoLeo values, Sinkhorn-Knopp marginals and reference equivalence,
softmax-centering EMA, the vectorised DINO pair loss against a naive double loop, and the DINO head."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2_repro.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, masks_weight_from_masks, sinkhorn_knopp
from dinov2_repro.models.dino_head import DINOHead


# ---------------------------------------------------------------------- plain-math helpers
def py_log_softmax(logits, temp):
    scaled = [v / temp for v in logits]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_z for v in scaled]


def py_cross_entropy(target_probs, student_logits, temp):
    return -sum(t * l for t, l in zip(target_probs, py_log_softmax(student_logits, temp)))


def py_softmax(logits, temp):
    exps = [math.exp(v / temp) for v in logits]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------------- DINO
def test_dino_loss_hand_computed_two_globals_and_one_local():
    # B = 1, K = 3. Crops: global A, global B, local L.
    s_a, s_b, s_l = [0.2, -0.1, 0.5], [1.0, 0.0, -1.0], [0.3, 0.3, -0.2]
    t_a, t_b = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]
    student = torch.tensor([[s_a], [s_b], [s_l]])  # (3 crops, B=1, K=3)
    teacher = torch.tensor([[t_a], [t_b]])  # (2, 1, 3)
    loss = DINOLoss(3, student_temp=0.1)
    # pairs: A vs teacher B, B vs teacher A, L vs A, L vs B
    pairs = [(t_b, s_a), (t_a, s_b), (t_a, s_l), (t_b, s_l)]
    expected = sum(py_cross_entropy(t, s, 0.1) for t, s in pairs) / 4
    got = loss.forward_pairs(student, teacher)
    assert got["loss"].item() == pytest.approx(expected, rel=1e-5)
    expected_global = (py_cross_entropy(t_b, s_a, 0.1) + py_cross_entropy(t_a, s_b, 0.1)) / 4
    assert got["global_crops"].item() == pytest.approx(expected_global, rel=1e-5)
    assert (got["global_crops"] + got["local_crops"]).item() == pytest.approx(expected, rel=1e-5)
    # with no local crop only the 2 cross pairs remain, and they are averaged (not summed)
    two = loss(student[:2], teacher).item()
    assert two == pytest.approx((py_cross_entropy(t_b, s_a, 0.1) + py_cross_entropy(t_a, s_b, 0.1)) / 2, rel=1e-5)


def naive_dino_loss(student_logits, teacher_probs, student_temp):
    """The reference formulation: Python loops over crops, same-view pairs skipped."""
    total, n_pairs = 0.0, 0
    for s_index in range(student_logits.shape[0]):
        log_p = F.log_softmax(student_logits[s_index] / student_temp, dim=-1)
        for t_index in range(teacher_probs.shape[0]):
            if s_index == t_index:
                continue
            total = total - torch.sum(teacher_probs[t_index] * log_p, dim=-1).mean()
            n_pairs += 1
    return total / n_pairs


@pytest.mark.parametrize("n_local", [0, 2, 8])
def test_dino_vectorised_equals_naive_double_loop(n_local):
    batch, k = 5, 17
    student = torch.randn(2 + n_local, batch, k, dtype=torch.float64) * 3
    teacher = torch.softmax(torch.randn(2, batch, k, dtype=torch.float64) * 2, dim=-1)
    fast_input = student.clone().requires_grad_(True)
    slow_input = student.clone().requires_grad_(True)
    fast = DINOLoss(k)(fast_input, teacher)
    slow = naive_dino_loss(slow_input, teacher, 0.1)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast_input.grad.double(), slow_input.grad, rtol=1e-5, atol=1e-9)


def test_dino_loss_stays_fp32_under_autocast():
    student = torch.randn(4, 3, 11)
    teacher = torch.softmax(torch.randn(2, 3, 11), dim=-1)
    reference = DINOLoss(11)(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = DINOLoss(11)(student.bfloat16(), teacher)
    assert under_autocast.dtype == torch.float32
    # only the bf16 rounding of the *inputs* differs; the reduction itself is fp32
    expected = DINOLoss(11)(student.bfloat16().float(), teacher)
    assert under_autocast.item() == pytest.approx(expected.item(), rel=1e-6)
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-2)


def test_softmax_centering_targets_and_two_ema_updates():
    loss = DINOLoss(3, center_momentum=0.9)
    batch1 = [[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]
    batch2 = [[0.0, 1.0, -1.0], [2.0, 2.0, 2.0], [1.0, 0.0, 4.0]]
    # first call: center is 0
    probs1 = loss.softmax_center_teacher(torch.tensor(batch1), teacher_temp=0.5)
    torch.testing.assert_close(probs1[0], torch.tensor(py_softmax(batch1[0], 0.5)))
    loss.update_center(torch.tensor(batch1))
    loss.apply_center_update()
    mean1 = [sum(col) / 2 for col in zip(*batch1)]
    center1 = [0.1 * m for m in mean1]
    torch.testing.assert_close(loss.center, torch.tensor([center1]))
    # second call uses center1, then a second update
    probs2 = loss.softmax_center_teacher(torch.tensor(batch2), teacher_temp=0.5)
    expected = py_softmax([v - c for v, c in zip(batch2[2], center1)], 0.5)
    torch.testing.assert_close(probs2[2], torch.tensor(expected))
    loss.update_center(torch.tensor(batch2))
    loss.apply_center_update()
    mean2 = [sum(col) / 3 for col in zip(*batch2)]
    center2 = [0.9 * c + 0.1 * m for c, m in zip(center1, mean2)]
    torch.testing.assert_close(loss.center, torch.tensor([center2]))
    assert "centering.center" in loss.state_dict()


def test_pending_center_update_is_applied_before_next_targets():
    loss = DINOLoss(2, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 4.0]]))  # not explicitly applied
    probs = loss.softmax_center_teacher(torch.tensor([[1.0, 2.0]]), teacher_temp=1.0)  # center (1, 2)
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.5]]))


def test_center_update_with_no_samples_keeps_center():
    loss = DINOLoss(3)
    loss.center.fill_(0.5)
    loss.update_center(torch.zeros(0, 3))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.full((1, 3), 0.5))


@pytest.mark.parametrize("loss_cls", [DINOLoss, iBOTPatchLoss])
def test_state_snapshot_settles_pending_updates_and_restore_undoes_later_ones(loss_cls):
    loss = loss_cls(2, center_momentum=0.5)
    loss.update_center(torch.tensor([[2.0, 4.0]]))  # pending: the snapshot must include it -> center (1, 2)
    snapshot = loss.state_snapshot()
    torch.testing.assert_close(snapshot["center"], torch.tensor([[1.0, 2.0]]))
    loss.update_center(torch.tensor([[5.0, 6.0]]))
    loss.apply_center_update()  # (3, 4)
    loss.update_center(torch.tensor([[100.0, 100.0]]))  # started after the snapshot, not finished: dropped too
    loss.restore_state(snapshot)
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 2.0]]))
    loss.apply_center_update()  # nothing pending any more
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 2.0]]))
    snapshot["center"].fill_(9.0)  # a copy, not a view of the buffer
    torch.testing.assert_close(loss.center, torch.tensor([[1.0, 2.0]]))


# ---------------------------------------------------------------------- Sinkhorn-Knopp
def numpy_sinkhorn(logits, temp, n_iterations):
    """Plain transcription of the published algorithm (no max subtraction), in float64."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / temp).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def test_sinkhorn_three_iterations_matches_numpy_reference():
    logits = torch.randn(12, 7) * 0.8
    got = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    expected = numpy_sinkhorn(logits.numpy(), 0.1, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert got.dtype == torch.float32


def test_sinkhorn_marginals_when_converged():
    torch.manual_seed(1)
    batch, k = 64, 8
    q = sinkhorn_knopp(torch.randn(batch, k), teacher_temp=1.0, n_iterations=200)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(batch))  # each sample is a distribution
    # each prototype receives 1/K of the total mass (B / K)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), batch / k), rtol=1e-4, atol=1e-4)
    # and after only 3 iterations rows are exact, columns approximately balanced
    q3 = sinkhorn_knopp(torch.randn(batch, k), teacher_temp=1.0, n_iterations=3)
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(batch))


def test_sinkhorn_max_subtraction_invariance_and_no_overflow():
    # fp64 so that adding 1000 does not itself round the logits (fp32 keeps ~5 digits after the offset)
    logits = torch.rand(10, 6, dtype=torch.float64) * 2 - 1  # cosine-like logits
    base = sinkhorn_knopp(logits, teacher_temp=0.04)
    # a huge common offset overflows exp(t / 0.04) without the max subtraction
    shifted = sinkhorn_knopp(logits + 1000.0, teacher_temp=0.04)
    assert torch.isfinite(shifted).all()
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-12)
    # per-prototype offsets cancel exactly in the first row normalisation as well
    per_prototype = sinkhorn_knopp(logits + torch.linspace(-50, 300, 6, dtype=torch.float64), teacher_temp=0.04)
    torch.testing.assert_close(per_prototype, base, rtol=1e-9, atol=1e-12)
    # and the fp32 path at a moderate offset
    torch.testing.assert_close(sinkhorn_knopp(logits.float() + 20.0, 0.04), base.float(), rtol=1e-3, atol=1e-5)
    assert not torch.isfinite(torch.exp((logits + 1000.0) / 0.04)).all()  # the naive formula would overflow


def test_sinkhorn_empty_input():
    out = sinkhorn_knopp(torch.zeros(0, 5), teacher_temp=0.07)
    assert out.shape == (0, 5)


# ---------------------------------------------------------------------- iBOT
def test_ibot_masks_weight_and_hand_computed_loss():
    # 4 global-crop images of 3 patches; image 0 has 2 masked patches, image 2 has 1, images 1 and 3 none.
    masks = torch.tensor([[True, False, True], [False] * 3, [False, True, False], [False] * 3])
    weights = masks_weight_from_masks(masks)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5, 1.0]))
    s = [[0.5, -0.5, 0.0], [1.0, 1.0, 0.0], [-1.0, 2.0, 0.5]]  # student logits of the 3 masked tokens
    t = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.0, 1.0, 0.0]]  # teacher targets
    ce = [py_cross_entropy(ti, si, 0.1) for ti, si in zip(t, s)]
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 4  # per-image mean, summed, / number of images
    got = iBOTPatchLoss(3, student_temp=0.1)(torch.tensor(s), torch.tensor(t), weights, n_images=4)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_center_is_mean_over_masked_tokens():
    loss = iBOTPatchLoss(2, center_momentum=0.8)
    tokens = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    loss.update_center(tokens)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.tensor([[0.2 * 2.0, 0.2 * 2.0]]))


def test_ibot_no_masked_tokens_gives_zero_with_graph():
    student = torch.zeros(0, 4, requires_grad=True)
    out = iBOTPatchLoss(4)(student, torch.zeros(0, 4), torch.zeros(0), n_images=6)
    assert out.item() == 0.0
    out.backward()


# ---------------------------------------------------------------------- KoLeo
def test_koleo_hand_computed_on_circle():
    angles = [0.0, 30.0, 100.0, 200.0]
    scales = [1.0, 3.0, 0.5, 2.0]  # the loss L2-normalises first
    x = torch.tensor([[s * math.cos(math.radians(a)), s * math.sin(math.radians(a))]
                      for a, s in zip(angles, scales)], dtype=torch.float32)
    # nearest neighbours by angle: 0<->30 (30 deg), 30->0 (30), 100->30 (70), 200->100 (100); chord 2 sin(d/2)
    gaps = [30.0, 30.0, 70.0, 100.0]
    expected = -sum(math.log(2 * math.sin(math.radians(g) / 2)) for g in gaps) / 4
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_duplicates_finite_loss_and_gradients():
    x = torch.randn(6, 16)
    x[3] = x[1]  # exact duplicate
    x[5] = x[1] * 2.0  # same direction: a duplicate after normalisation
    x.requires_grad_(True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 5  # half the rows at -log(~eps) ~ 17: large but finite
    assert torch.isfinite(x.grad).all()
    # all-identical batch
    y = torch.ones(4, 8, requires_grad=True)
    loss_y = KoLeoLoss()(y)
    loss_y.backward()
    assert torch.isfinite(loss_y) and torch.isfinite(y.grad).all()


def test_koleo_batch_of_one_is_zero_and_backward_works():
    x = torch.randn(1, 8, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(x.grad, torch.zeros(1, 8))


def test_koleo_fp16_input_under_autocast_is_fp32_and_finite():
    x = torch.randn(8, 32)
    x[2] = x[0]
    x16 = x.half().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(x16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x16.grad.float()).all()
    # in fp32, the value matches the fp32 computation of the (fp16-rounded) input
    assert loss.item() == pytest.approx(KoLeoLoss()(x.half().float()).item(), rel=1e-6)


# ---------------------------------------------------------------------- DINO head
def test_dino_v1_head_shapes_normalised_prototypes_and_init():
    head = DINOHead(in_dim=32, out_dim=50, hidden_dim=64, bottleneck_dim=16, nlayers=3, norm_last_layer=True)
    x = torch.randn(7, 32)
    logits = head(x)
    assert logits.shape == (7, 50)
    # logits are cosine similarities (bottleneck L2-normalised, prototypes L2-normalised, g = 1)
    assert logits.abs().max() <= 1.0 + 1e-5
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    expected = bottleneck @ F.normalize(head.last_layer.weight, dim=1).t()
    torch.testing.assert_close(logits, expected)
    # scaling a prototype row does not change the output (weight norm with g fixed to 1)
    with torch.no_grad():
        head.last_layer.weight[3] *= 7.0
    torch.testing.assert_close(head(x), logits)
    names = dict(head.named_parameters())
    assert set(n for n in names if n.startswith("last_layer")) == {"last_layer.weight"}  # no bias, no gain
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(torch.count_nonzero(m.bias) == 0 for m in linears)
    assert 0.01 < linears[0].weight.std().item() < 0.03  # trunc_normal(0.02)


def test_dinov2_head_trains_the_weight_norm_gain_like_torchs_weight_norm():
    # The released DINOv2 head: nn.utils.weight_norm(nn.Linear(bottleneck, K, bias=False)), g filled with 1, g trained.
    from dinov2_repro.train.param_groups import get_params_groups_with_decay

    torch.manual_seed(0)
    head = DINOHead(in_dim=8, out_dim=6, hidden_dim=12, bottleneck_dim=4, nlayers=2)
    assert head.last_layer.weight_g.shape == (6, 1) and torch.equal(head.last_layer.weight_g, torch.ones(6, 1))
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [0.5], [1.0], [3.0], [1.0]]))
    reference = torch.nn.utils.weight_norm(torch.nn.Linear(4, 6, bias=False))
    with torch.no_grad():
        reference.weight_v.copy_(head.last_layer.weight)
        reference.weight_g.copy_(head.last_layer.weight_g)
    z = F.normalize(torch.randn(5, 4), dim=-1)
    out, expected = head.last_layer(z), reference(z)
    torch.testing.assert_close(out, expected)
    cosine = z @ F.normalize(head.last_layer.weight, dim=1).t()
    torch.testing.assert_close(out[:, 1], 2 * cosine[:, 1])  # prototype 1's logits doubled by g = 2
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(head.last_layer.weight_g.grad, reference.weight_g.grad)
    torch.testing.assert_close(head.last_layer.weight.grad, reference.weight_v.grad)
    # optimiser groups as the published ones: g is in the last layer (its lr, frozen with it) and decays (x1)
    groups = {g["name"]: g for g in get_params_groups_with_decay(head)}
    assert groups["last_layer.weight_g"]["is_last_layer"] and groups["last_layer.weight_g"]["wd_multiplier"] == 1.0


@pytest.mark.parametrize("nlayers,use_bn", [(1, False), (2, True), (3, True)])
def test_dino_head_layer_counts(nlayers, use_bn):
    head = DINOHead(in_dim=8, out_dim=5, hidden_dim=12, bottleneck_dim=4, nlayers=nlayers, use_bn=use_bn)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    norms = [m for m in head.mlp if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == nlayers
    assert len(norms) == (nlayers - 1 if use_bn else 0)
    assert head(torch.randn(4, 8)).shape == (4, 5)
