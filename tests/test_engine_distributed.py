"""Two gloo processes (torchrun) against one process on the same global batch: DDP, FSDP2, and checkpoints that
move between an FSDP run and a single-process run in both directions.

All runs see the same images through `FixedLoader` (see test_engine_common): the real pipeline seeds iBOT masks
from each rank's own batch, so 2 x B images and 1 x 2B images get different masks by design. KoLeo is off
because its nearest neighbours are searched within one rank's batch (as in the reference), which makes the
objective itself depend on the sharding. Everything else (DINO, iBOT, centering, clipping, AdamW, EMA) must
agree to float rounding.

One torchrun launch runs the three 2-process phases (DDP run, FSDP run, FSDP resumed from a single-process
checkpoint) to pay the process start-up once; this file is also the worker script (``--worker DIR``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine_common import FixedLoader, tiny_cfg  # noqa: E402

from dinov2_repro.train.guards import CPU_FSDP_MIN_TORCH, torch_version  # noqa: E402

ITERS, SAVE_AT, PER_RANK, WORLD = 4, 2, 4, 2
COMMON = ["koleo.loss_weight=0", f"train.max_iterations={ITERS}", f"checkpoint.period_iterations={SAVE_AT}",
          "optim.clip_grad=0.5"]  # a clip that bites: the global gradient norm must be the same everywhere
LOSSES = ("total_loss", "dino_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss")
CPU_FSDP = torch_version() >= CPU_FSDP_MIN_TORCH  # older torch: the engine refuses FSDP on CPU (guards)
needs_cpu_fsdp = pytest.mark.skipif(not CPU_FSDP, reason=f"FSDP2 on CPU needs torch >= {CPU_FSDP_MIN_TORCH}")
PHASES = {  # run directory -> parallelism, for the 2-process worker
    "ddp": "ddp",
    **({"fsdp": "fsdp", "fsdp_from_single": "fsdp"} if CPU_FSDP else {}),
}


def _cfg(world: int, parallelism: str):
    return tiny_cfg(*COMMON, f"train.batch_size_per_gpu={PER_RANK * WORLD // world}",
                    f"compute.parallelism={parallelism}")


class SigtermOnRank1(FixedLoader):
    """FixedLoader that sends SIGTERM to rank 1 alone while it fetches the batch of iteration 1."""

    def __call__(self, cfg, rank, world, start_batch):
        for i, batch in enumerate(super().__call__(cfg, rank, world, start_batch)):
            if rank == 1 and i == 1:
                signal.raise_signal(signal.SIGTERM)
            yield batch


def _worker(base: Path) -> None:
    import torch.distributed as dist

    from dinov2_repro.distributed.env import detect_env, init_distributed, teardown
    from dinov2_repro.train.engine import train
    from dinov2_repro.train.signals import TrainingStopped

    init_distributed(detect_env(), device_type="cpu")
    try:
        for name, parallelism in PHASES.items():
            # The DDP run also reports unreadable files on both ranks (counted, not really dropped here).
            loader = FixedLoader(skipped_every=2 if name == "ddp" else 0)
            train(_cfg(WORLD, parallelism), base / name, data_loader_fn=loader)
        try:  # SIGTERM reaching one rank only must stop both after the same iteration, with one checkpoint
            train(_cfg(WORLD, "ddp"), base / "sigterm", data_loader_fn=SigtermOnRank1())
        except TrainingStopped as stop:
            (base / f"sigterm_rank{dist.get_rank()}.json").write_text(json.dumps(
                {"iteration": stop.iteration, "checkpoint": stop.checkpoint, "signal": stop.signal_name}))
    finally:
        teardown()


def _resume_copy(source: Path, target: Path, checkpoint_name: str) -> None:
    """A new run directory holding only ``checkpoint_name`` of ``source`` (as if interrupted right after it)."""
    (target / "checkpoints").mkdir(parents=True)
    src = source / "checkpoints" / checkpoint_name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, target / "checkpoints" / checkpoint_name)
    (target / "checkpoints" / "latest").write_text(checkpoint_name + "\n")


def _losses(run: Path):
    from dinov2_repro.train.metrics import read_metrics

    return {r["iteration"]: [r[k] for k in LOSSES] for r in read_metrics(run / "metrics.jsonl")}


def _export(run: Path):
    return torch.load(run / "export/teacher_backbone.pth", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dinov2_repro.train.engine import train

    base = tmp_path_factory.mktemp("dist")
    train(_cfg(1, "none"), base / "single", data_loader_fn=FixedLoader())
    if CPU_FSDP:
        _resume_copy(base / "single", base / "fsdp_from_single", "checkpoint_0000002.pth")

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", f"--nproc-per-node={WORLD}", __file__, "--worker", str(base)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    if CPU_FSDP:
        _resume_copy(base / "fsdp", base / "single_from_fsdp", "checkpoint_0000002")
        train(_cfg(1, "none"), base / "single_from_fsdp", data_loader_fn=FixedLoader())
    return base


def _assert_same_run(run: Path, reference: Path, first_iteration: int = 1):
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == list(range(first_iteration, ITERS + 1))
    for it, values in got.items():
        torch.testing.assert_close(torch.tensor(values), torch.tensor(want[it]), rtol=1e-5, atol=1e-6,
                                   msg=f"iteration {it}")
    a, b = _export(run), _export(reference)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_training_moves_the_weights(runs):
    # Guard against vacuous comparisons: the runs below must differ from the initial state.
    losses = _losses(runs / "single")
    assert losses[1] != losses[ITERS]
    summary = json.loads((runs / "single/summary.json").read_text())
    assert summary["final_diagnostics"]["grad_norm_backbone"] > 0.5  # the clip at 0.5 was active


def test_ddp_two_processes_match_one_process(runs):
    _assert_same_run(runs / "ddp", runs / "single")
    summary = json.loads((runs / "ddp/summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["global_batch"] == PER_RANK * WORLD
    # iterations 0 and 2, on each of the 2 ranks: counted over all ranks, paths of both ranks
    assert summary["skipped_files"] == {"count": 4, "paths": [f"/data/broken_{it}_0_{rank}.png"
                                                              for it in (0, 2) for rank in (0, 1)]}


@needs_cpu_fsdp
def test_fsdp_two_processes_match_one_process(runs):
    _assert_same_run(runs / "fsdp", runs / "single")
    files = sorted(p.name for p in (runs / "fsdp/checkpoints/checkpoint_0000004").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # DCP: one shard file per rank


@needs_cpu_fsdp
def test_fsdp_checkpoint_resumes_on_one_process(runs):
    _assert_same_run(runs / "single_from_fsdp", runs / "fsdp", first_iteration=SAVE_AT + 1)
    summary = json.loads((runs / "single_from_fsdp/summary.json").read_text())
    assert summary["start_iteration"] == SAVE_AT and summary["world_size"] == 1


@needs_cpu_fsdp
def test_single_process_checkpoint_resumes_under_fsdp(runs):
    _assert_same_run(runs / "fsdp_from_single", runs / "single", first_iteration=SAVE_AT + 1)


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_iteration(runs):
    stops = [json.loads((runs / f"sigterm_rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [s["iteration"] for s in stops] == [2, 2]  # rank 1's signal came during iteration 2 (1-based)
    assert stops[1]["signal"] == "SIGTERM" and stops[0]["signal"] == "SIGTERM"  # rank 0 names the agreed stop
    assert (runs / "sigterm/checkpoints/checkpoint_0000002.pth").is_file()
    assert (runs / "sigterm/checkpoints/latest").read_text().strip() == "checkpoint_0000002.pth"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(Path(sys.argv[2]))
