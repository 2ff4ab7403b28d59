"""Mixed precision on CUDA: bf16 autocast, fp16 autocast with a checkpointed grad scaler, overflow handling, and
FSDP2 bf16 with per-block compile and activation checkpointing under torchrun. Skipped without CUDA."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine_common import FixedLoader, tiny_cfg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def _cuda_cfg(*overrides):
    return tiny_cfg("compute.device=cuda", *overrides)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_checkpoints_and_resumes_on_cuda(tmp_path, precision):
    from dinov2_repro.train import checkpoint as ckpt
    from dinov2_repro.train.engine import train
    from dinov2_repro.train.metrics import read_metrics

    cfg = _cuda_cfg(f"compute.precision={precision}", "train.max_iterations=4")
    summary = train(cfg, tmp_path / "straight", data_loader_fn=FixedLoader())
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_losses"].values())
    records = read_metrics(tmp_path / "straight/metrics.jsonl")
    assert records[-1]["peak_memory_mb"] > 0
    meta = ckpt.read_checkpoint_meta(ckpt.latest_checkpoint(tmp_path / "straight"))
    if precision == "fp16":
        assert meta["grad_scaler"] is not None and meta["grad_scaler"]["scale"] == records[-1]["grad_scale"]
    else:
        assert meta["grad_scaler"] is None and "grad_scale" not in records[-1]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "straight/checkpoints/checkpoint_0000002.pth", resumed / "checkpoints")
    (resumed / "checkpoints/latest").write_text("checkpoint_0000002.pth\n")
    again = train(cfg, resumed, data_loader_fn=FixedLoader())
    for key, value in summary["final_losses"].items():  # GPU kernels need not be bitwise deterministic
        assert again["final_losses"][key] == pytest.approx(value, rel=2e-2, abs=1e-3), key


def test_fp16_overflow_backs_off_the_scale_without_stopping(tmp_path, monkeypatch):
    from dinov2_repro.train.engine import train
    from dinov2_repro.train.meta_arch import SSLMetaArch
    from dinov2_repro.train.metrics import read_metrics

    original = SSLMetaArch.training_step
    calls = {"n": 0}

    def huge_first_loss(self, batch, teacher_temp):
        out = original(self, batch, teacher_temp)
        if calls["n"] == 0:  # finite in fp32, but its scaled gradients overflow fp16
            out["total_loss"] = out["total_loss"] * 1e30
        calls["n"] += 1
        return out

    monkeypatch.setattr(SSLMetaArch, "training_step", huge_first_loss)
    # KoLeo off: this tiny model's CLS tokens are near-identical at init (std ~3e-7), so KoLeo's 1/distance
    # gradient (~2e3 at the final norm) overflows fp16 at any scale above ~30 on its own (2 overflows, seen on
    # an H200). The test is about the injected overflow alone.
    cfg = _cuda_cfg("compute.precision=fp16", "train.max_iterations=2", "koleo.loss_weight=0")
    summary = train(cfg, tmp_path / "run", data_loader_fn=FixedLoader())
    assert summary["fp16_overflow_steps"] == 1 and summary["skipped_batches"] == 0
    records = read_metrics(tmp_path / "run/metrics.jsonl")
    assert records[0]["grad_scale"] == 2.0**15  # 2^16 backed off once


def _worker(run_dir: Path) -> None:
    from dinov2_repro.train.engine import train

    cfg = _cuda_cfg("compute.precision=bf16", "compute.param_dtype=bf16", "compute.parallelism=fsdp",
                    "compute.compile=true", "compute.activation_checkpointing=true", "train.max_iterations=2",
                    "student.drop_path_rate=0.2")
    train(cfg, run_dir, data_loader_fn=FixedLoader())


def test_fsdp_bf16_with_compile_and_activation_checkpointing_under_torchrun(tmp_path):
    from dinov2_repro.models.weights import build_from_export

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node=1", __file__, "--worker", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (tmp_path / "run/checkpoints/checkpoint_0000002/.metadata").exists()
    model = build_from_export(tmp_path / "run/export")  # full, gathered, strict-loadable
    assert model.embed_dim == 32


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
