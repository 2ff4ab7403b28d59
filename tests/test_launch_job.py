"""TrainJob end to end through submitit's local executor: submitted, preempted (USR2 right after the iteration-3
checkpoint), requeued by submitit, resumed to completion exactly like an uninterrupted run."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dinov2_repro.distributed import submit as S

REPO = Path(__file__).resolve().parents[1]

TINY = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "student.patch_size=8",
        "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
        "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
        "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
        "train.batch_size_per_gpu=4", "data.kind=kaggle", "data.split=Training", "data.num_workers=0",
        "data.pin_memory=false",
        "data.persistent_workers=false", "compute.device=cpu", "compute.precision=fp32",
        "logging.progress_bar=false", "logging.log_period_iterations=1",
        "evaluation.eval_period_iterations=1000",
        # a short schedule so that lr, momentum and teacher temperature all move within the 6 iterations
        "train.official_epoch_length=2", "optim.epochs=3", "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1", "optim.freeze_last_layer_epochs=0",
        # LayerScale 1e-5 leaves every image's CLS token almost the same at init; KoLeo (-log of the nearest
        # distance, ~1e-7 then) would measure float noise, which differs between processes. 0.1 keeps the
        # features apart, so matching losses test the resume, and a one-draw RNG shift moves them by > 1%.
        "student.layerscale=0.1"]


@pytest.fixture(scope="module")
def mri_dir(tmp_path_factory):
    from dinov2_repro.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic_mri")
    # small phantoms in the Kaggle layout: 48 px decode and crop ~5x faster than the 256 px of data.kind=synthetic
    generate_dataset(root, n_per_class=4, seed=0, size=48)
    return root


def _loss_records(run_dir: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in records}


class PreemptedOnce(S.TrainJob):
    """A TrainJob whose first attempt is preempted by SLURM right after the checkpoint of iteration 3.

    Sent by value to the job process (cloudpickle), so the test controls it there; what follows the signal is
    submitit's real machinery: its USR2 handler calls `checkpoint()`, dumps the returned submission, exits
    for requeue, and the local controller starts the requeued job.
    """

    def __call__(self):
        from dinov2_repro.train import checkpoint as ckpt

        output_dir = S.parse_train_args(self.train_args).output_dir
        if ckpt.latest_checkpoint(output_dir) is None:  # first attempt only
            save = ckpt.save_checkpoint

            def save_then_get_preempted(run_dir, iteration, *args, **kwargs):
                path = save(run_dir, iteration, *args, **kwargs)
                if iteration == 3:
                    os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends before preempting the job
                    time.sleep(30)  # interrupted: submitit's handler requeues and exits
                return path

            ckpt.save_checkpoint = save_then_get_preempted
        return super().__call__()


@pytest.mark.slow  # ~30 s on 2 busy cores: three processes import torch
def test_submitted_job_is_preempted_requeued_and_matches_the_uninterrupted_run(tmp_path, mri_dir):
    """One local job does it all (each job process pays the torch import, so there is only one): submitted
    through the `submit` path, preempted after the iteration-3 checkpoint, requeued by submitit, resumed to
    completion; its losses equal those of an uninterrupted in-process run, iteration by iteration."""
    import cloudpickle

    common = [*TINY, f"data.path={mri_dir}", "train.max_iterations=6", "checkpoint.period_iterations=3"]

    # reference: the same training, never interrupted (in this process)
    reference_dir = tmp_path / "reference"
    reference = S.TrainJob(["--output-dir", str(reference_dir), *common])()
    assert reference["start_iteration"] == 0 and reference["iterations"] == 6

    run_dir = tmp_path / "preempted"
    submission = S.prepare_submission(["--gpus-per-node", "0", "--time", "20", "--output-dir", str(run_dir),
                                       "--", *common])
    submission.job = PreemptedOnce(submission.job.train_args)  # same arguments: the frozen submitted config
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        job = S.submit(submission, cluster="local")
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    summary = job.result()

    # the requeued job started from the saved iteration and trained to the end
    assert summary["start_iteration"] == 3 and summary["iterations"] == 6 and summary["global_batch"] == 4
    events = S.read_job_records(run_dir)
    assert [e["event"] for e in events] == ["submitted", "started", "requeue", "started", "finished"]
    assert {e["job_id"] for e in events} == {str(job.job_id)}  # requeued under the same job id
    assert [e.get("attempt") for e in events if e["event"] == "started"] == [1, 2]
    assert events[2]["resume_from"].endswith("checkpoint_0000003.pth")
    log = Path(str(job.paths.stdout)).read_text()
    assert log.count("rank 0 of world size 1") == 2  # the start-up report of both attempts
    assert "effective batch 4 = 4 per GPU x 1 processes x 1 accumulation steps" in log
    assert "preempted or timed out: requeueing" in log

    # the run directory holds a complete run
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "checkpoint_0000006.pth"
    for name in ("config.yaml", S.SUBMITTED_CONFIG, "summary.json", "export/teacher_backbone.pth"):
        assert (run_dir / name).is_file(), name

    # ... and its losses are those of the uninterrupted run, iteration by iteration
    expected, got = _loss_records(reference_dir), _loss_records(run_dir)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for iteration in range(1, 7):
        assert set(got[iteration]) == set(expected[iteration]) and "total_loss" in got[iteration]
        for key, value in expected[iteration].items():
            # bit-exact in one process; across processes the CPU kernels may split work differently
            assert got[iteration][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (iteration, key)
    # the losses do move, so matching them means something
    assert len({round(expected[i]["total_loss"], 6) for i in range(1, 7)}) > 1


def test_checkpoint_returns_the_job_pinned_to_its_run_directory_with_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("cfg.yaml").write_text((REPO / "configs" / "train" / "demo_cpu.yaml").read_text())
    job = S.TrainJob(["--config", "cfg.yaml", "--output-dir", "runs/rel", "optim.epochs=2"], resume=False)
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, S.TrainJob) and again.resume and not delayed.args
    # absolute paths: the requeued job may start in another working directory
    assert again.train_args == ["--config", str(tmp_path / "cfg.yaml"), "--output-dir", str(tmp_path / "runs/rel"),
                                "optim.epochs=2"]
    (record,) = S.read_job_records(tmp_path / "runs" / "rel")
    assert record["event"] == "requeue" and record["resume_from"] is None


def test_no_resume_submission_refuses_a_run_with_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_0000003.pth").write_bytes(b"")
    (out / "checkpoints" / "latest").write_text("checkpoint_0000003.pth\n")
    preset = str(REPO / "configs" / "train" / "demo_cpu.yaml")
    assert S.main(["--output-dir", str(out), "--dry-run", "--", "--config", preset, "--no-resume"]) == 2
    assert "checkpoint_0000003.pth" in capsys.readouterr().err
    assert S.main(["--output-dir", str(out), "--dry-run", "--", "--config", preset]) == 0  # resuming is fine


def test_eval_job_reports_a_failing_evaluation(tmp_path):
    job = S.EvalJob(["knn", "--backbone", "random:vit_small/8,embed_dim=32,depth=2,num_heads=2,img_size=32",
                     "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "knn")])
    with pytest.raises(RuntimeError, match="exited with status 2"):
        job()
