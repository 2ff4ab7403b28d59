"""Checkpoint files: round trip of model/optimizer/scaler/RNG, atomic writes, `latest`, pruning (single process)."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from dinov2_repro.train import checkpoint as ckpt


class TwoTower(nn.Module):
    """A stand-in for the meta-arch: a trained student, a frozen teacher and a loss buffer."""

    def __init__(self):
        super().__init__()
        self.student = nn.ModuleDict({"backbone": nn.Linear(4, 3), "dino_head": nn.Linear(3, 2)})
        self.teacher = nn.ModuleDict({"backbone": nn.Linear(4, 3), "dino_head": nn.Linear(3, 2)})
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, 2))


def _trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = TwoTower()
    opt = torch.optim.AdamW(
        [{"params": list(model.student["backbone"].parameters()), "lr_multiplier": 0.5},
         {"params": list(model.student["dino_head"].parameters()), "lr_multiplier": 1.0}], lr=0.1)
    for _ in range(steps):
        loss = model.student["dino_head"](model.student["backbone"](torch.randn(5, 4))).pow(2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.center.fill_(0.25)
    model.teacher["backbone"].weight.data.mul_(3.0)
    return model, opt


def test_round_trip_restores_model_optimizer_and_continues_identically(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"config": {"a": 1}}, sharded=False, keep_last=2)
    assert path.name == "checkpoint_0000007.pth"
    assert ckpt.latest_checkpoint(tmp_path) == path

    fresh, fresh_opt = _trained(seed=1, steps=0)
    meta = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert meta["iteration"] == 7 and meta["config"] == {"a": 1} and meta["world_size"] == 1
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    # Optimizer state is keyed by name, so the same next step gives bitwise the same weights.
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m.student["dino_head"](m.student["backbone"](x)).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.student["backbone"].weight, fresh.student["backbone"].weight)
    assert fresh_opt.param_groups[0]["lr_multiplier"] == 0.5


def test_checkpoint_keys_are_the_module_names(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, sharded=False, keep_last=1)
    saved = torch.load(path, weights_only=False)
    assert set(saved["model"]) == set(model.state_dict())
    assert "student.backbone.weight" in saved["optimizer"]["state"]  # by name, not by index
    assert all(t.device.type == "cpu" for t in saved["model"].values())


def test_keep_last_latest_and_leftover_tmp(tmp_path):
    model, opt = _trained()
    (tmp_path / "checkpoints").mkdir()
    # A crashed save leaves a .tmp: never listed, never pointed at, overwritten by the next save.
    (tmp_path / "checkpoints" / "checkpoint_0000009.pth.tmp").write_bytes(b"torn")
    for it in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, it, model, opt, {}, sharded=False, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint_0000006.pth", "checkpoint_0000008.pth"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint_0000008.pth"
    assert not (tmp_path / "checkpoints" / "latest.tmp").exists()


def test_latest_pointing_at_a_missing_checkpoint_is_an_error(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("checkpoint_0000005.pth\n")
    with pytest.raises(FileNotFoundError, match="checkpoint_0000005.pth"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_states_round_trip(tmp_path):
    model, opt = _trained()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, sharded=False, keep_last=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    meta = ckpt.read_checkpoint_meta(path)
    assert ckpt.restore_rank_rng(meta, rank=0, world_size=1)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert not ckpt.restore_rank_rng(meta, rank=1, world_size=2)  # other world size: restored but not exact


def test_grad_scaler_state_is_saved(tmp_path):
    model, opt = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, sharded=False, keep_last=1, scaler=scaler)
    other = torch.amp.GradScaler("cpu", init_scale=2.0, enabled=True)
    ckpt.load_checkpoint(path, *_trained(steps=0), scaler=other)
    assert other.state_dict()["scale"] == 1024.0


def test_dcp_folder_written_in_one_process_loads_into_a_plain_model(tmp_path):
    model, opt = _trained()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, {"counters": {"x": 1}}, sharded=True, keep_last=1)
    assert path.is_dir() and (path / "meta.pt").exists()
    fresh, fresh_opt = _trained(seed=5, steps=0)
    meta = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert meta["counters"] == {"x": 1}
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"],
                       fresh_opt.state[fresh_opt.param_groups[0]["params"][0]]["exp_avg"])
