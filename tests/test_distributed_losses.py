"""Two gloo processes, each holding half of a batch, must produce the same softmax-centering center and the
same Sinkhorn-Knopp targets as one process holding the whole batch (including uneven and empty halves)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_repro.distributed.env import teardown
from dinov2_repro.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp

K, TEMP = 16, 0.07


def make_data():
    gen = torch.Generator().manual_seed(0)
    cls = torch.rand(12, K, generator=gen) * 2 - 1  # 6 samples per rank
    patches = torch.rand(11, K, generator=gen) * 2 - 1  # uneven: 4 tokens on rank 0, 7 on rank 1
    center0 = torch.randn(1, K, generator=gen) * 0.1
    return cls, patches, center0


def split(cls, patches):
    return {0: (cls[:6], patches[:4]), 1: (cls[6:], patches[4:])}


def compute(cls, patches, center0):
    """The computation under test, identical in both settings."""
    dino = DINOLoss(K, center_momentum=0.9)
    dino.center.copy_(center0)
    dino_targets = dino.softmax_center_teacher(cls, TEMP)
    dino.update_center(cls)
    dino.apply_center_update()
    ibot = iBOTPatchLoss(K, center_momentum=0.9)
    ibot.update_center(patches)
    ibot.apply_center_update()
    return {
        "dino_targets": dino_targets,
        "dino_center": dino.center.clone(),
        "ibot_center": ibot.center.clone(),
        "sk_cls": sinkhorn_knopp(cls, TEMP),
        "sk_patches": sinkhorn_knopp(patches, TEMP),
    }


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cls, patches, center0 = make_data()
        local_cls, local_patches = split(cls, patches)[rank]
        result = compute(local_cls, local_patches, center0)
        # a rank without masked tokens must still take part in the collectives
        empty_or_all = patches if rank == 0 else patches[:0]
        result["sk_one_rank_empty"] = sinkhorn_knopp(empty_or_all, TEMP)
        ibot = iBOTPatchLoss(K)
        ibot.update_center(empty_or_all)
        ibot.apply_center_update()
        result["ibot_center_one_rank_empty"] = ibot.center.clone()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        teardown()


@pytest.mark.timeout(120)
def test_two_process_centering_and_sinkhorn_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init_store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    cls, patches, center0 = make_data()
    single = compute(cls, patches, center0)
    halves = split(cls, patches)

    for r in range(2):  # centers: identical on both ranks and equal to the whole-batch EMA
        torch.testing.assert_close(ranks[r]["dino_center"], single["dino_center"])
        torch.testing.assert_close(ranks[r]["ibot_center"], single["ibot_center"])
    # the iBOT center is the mean over all masked tokens (token-weighted, not a mean of per-rank means)
    torch.testing.assert_close(single["ibot_center"], 0.1 * patches.mean(0, keepdim=True))
    torch.testing.assert_close(torch.cat([ranks[0]["dino_targets"], ranks[1]["dino_targets"]]), single["dino_targets"])
    torch.testing.assert_close(torch.cat([ranks[0]["sk_cls"], ranks[1]["sk_cls"]]), single["sk_cls"])
    torch.testing.assert_close(torch.cat([ranks[0]["sk_patches"], ranks[1]["sk_patches"]]), single["sk_patches"])
    assert ranks[0]["sk_patches"].shape[0] == halves[0][1].shape[0]
    # SK over the global batch differs from SK over a rank's half alone: the all-reduce matters
    assert not torch.allclose(ranks[0]["sk_cls"], sinkhorn_knopp(halves[0][0], TEMP))
    # one rank with no tokens: the other rank gets the single-process answer
    torch.testing.assert_close(ranks[0]["sk_one_rank_empty"], sinkhorn_knopp(patches, TEMP))
    assert ranks[1]["sk_one_rank_empty"].shape == (0, K)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["ibot_center_one_rank_empty"], 0.1 * patches.mean(0, keepdim=True))
