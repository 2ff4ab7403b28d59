"""`dinov2-repro submit`: option parsing, --dry-run, and the real submitit submission path (fake sbatch/srun)."""

import os
import stat
import sys
from pathlib import Path

import pytest

from dinov2_repro.distributed import submit as S
from dinov2_repro.config import load_config

REPO = Path(__file__).resolve().parents[1]
VITS_PRESET = REPO / "configs" / "train" / "vits14_brain_mri.yaml"


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("01:30:00", 90), ("24:00:00", 1440), ("00:00:30", 1), ("00:10:01", 11),
    ("1-00:00:00", 1440), ("2-12", 3600), ("1-01:30", 1530),
])
def test_time_parsing(text, minutes):
    assert S.parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["2:00", "abc", "", "0", "1h", "-5"])
def test_bad_time_is_refused_with_the_value(text):
    with pytest.raises(S.SubmitError) as info:
        S.parse_time_minutes(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text, slurm", [
    ("64G", "64G"), ("64gb", "64G"), ("500M", "500M"), ("256", "256G"), ("1.5G", "1536M"), ("0", "0G"),
])
def test_mem_parsing(text, slurm):
    assert S.parse_mem(text) == slurm


def test_bad_mem_is_refused():
    with pytest.raises(S.SubmitError, match="'lots'"):
        S.parse_mem("lots")


def test_train_args_grammar_and_unknown_flags():
    request = S.parse_train_args(["--config", "a.yaml", "optim.epochs=5", "--output-dir", "runs/x", "--resume"])
    assert (request.config, request.output_dir, request.resume, request.overrides) == (
        "a.yaml", "runs/x", True, ["optim.epochs=5"])
    with pytest.raises(S.SubmitError, match="--bogus"):
        S.parse_train_args(["--config", "a.yaml", "--bogus"])
    with pytest.raises(S.SubmitError, match="notakeyvalue"):
        S.parse_train_args(["notakeyvalue"])


def test_effective_batch_and_lr_hand_computed():
    cfg = load_config(VITS_PRESET, ["train.batch_size_per_gpu=32", "train.grad_accum_steps=2"])
    batch, lr, text = S.effective_batch_and_lr(cfg, world_size=8)
    assert batch == 32 * 8 * 2 == 512
    assert lr == pytest.approx(0.004 * (512 / 1024) ** 0.5)  # 0.0028284
    assert "512" in text and "0.00282843" in text
    cfg = load_config(VITS_PRESET, ["optim.scaling_rule=linear_wrt_256", "train.batch_size_per_gpu=64"])
    assert S.effective_batch_and_lr(cfg, 2)[1] == pytest.approx(0.004 * 128 / 256)


# ------------------------------------------------------------------------------------------------ dry run
FULL_OPTIONS = ["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu-long", "--account", "proj42",
                "--qos", "high", "--time", "12:00:00", "--constraint", "a100|h100", "--mem", "480G",
                "--cpus-per-task", "12", "--exclusive", "--comment", "dinov2 run", "--job-name", "vits-mri"]


def test_dry_run_prints_resources_command_and_resolved_config(tmp_path, capsys):
    out = tmp_path / "run a"
    argv = FULL_OPTIONS + ["--output-dir", str(out), "--dry-run", "--",
                           "--config", str(VITS_PRESET), "optim.epochs=50", "train.batch_size_per_gpu=16",
                           "compute.parallelism=ddp"]
    assert S.main(argv) == 0
    text = capsys.readouterr().out
    for line in ["#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu-long", "#SBATCH --time=720", "#SBATCH --account=proj42",
                 "#SBATCH --qos=high", "#SBATCH --constraint='a100|h100'", "#SBATCH --mem=480G",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --exclusive", "#SBATCH --comment='dinov2 run'",
                 "#SBATCH --job-name=vits-mri", "#SBATCH --signal=USR2@90", "#SBATCH --requeue"]:
        assert line in text.splitlines(), line
    command = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(command) == 1 and "-m submitit.core._submit" in command[0] and sys.executable in command[0]
    assert "--cpus-per-task=12" in command[0].split()  # srun does not inherit it on SLURM 22.05-23.02
    assert str(out / "slurm" / "%j") in command[0]
    # the resolved config, overrides applied, after the script
    config_text = text.split("resolved config", 1)[1]
    assert "epochs: 50" in config_text and "batch_size_per_gpu: 16" in config_text
    assert "arch: vit_small" in config_text
    # 16 per GPU x 16 processes = 256: sqrt rule gives 0.004 * 0.5
    assert "effective batch 256" in text and "world size 16" in text and "peak lr 0.002 " in text
    assert not out.exists(), "a dry run must not write anything"


def test_dry_run_defaults_and_eval_task(tmp_path, capsys):
    out = tmp_path / "eval1"
    argv = ["--task", "eval", "--gpus-per-node", "1", "--dry-run", "--", "linear", "--backbone", "runs/x",
            "--data", "data/mri", "--output-dir", str(out), "linear.iterations=7"]
    assert S.main(argv) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=1" in text
    assert f"#SBATCH --time={S.DEFAULT_TIME_MIN}" in text
    assert "#SBATCH --job-name=dinov2-eval-eval1" in text
    assert "#SBATCH --requeue" not in text  # an evaluation that fails is not rerun behind your back
    # the eval command the job runs, on the config frozen at submission, and that resolved eval config
    assert f"runs: dinov2-repro eval linear --backbone runs/x --data data/mri --output-dir {out}" in text
    assert f"--config {out / S.SUBMITTED_EVAL_CONFIG}" in text
    assert "iterations: 7" in text.split("resolved config", 1)[1]


def test_eval_default_output_dir_is_the_eval_cli_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    submission = S.prepare_submission(["--task", "eval", "--dry-run", "--", "knn", "--backbone", "runs/vits14",
                                       "--data", "d"])
    assert submission.output_dir == tmp_path / "runs" / "eval" / "knn_vits14"


@pytest.mark.parametrize("argv", [
    ["--task", "eval", "--dry-run", "--", "knn", "--data", "d"],  # --backbone missing
    ["--task", "eval", "--dry-run", "--", "probe", "--backbone", "b", "--data", "d"],  # no such mode
])
def test_bad_eval_arguments_are_the_eval_cli_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        S.main(argv)
    assert info.value.code == 2 and "dinov2-repro eval" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--time", "2:00", "--dry-run", "--", "--config", str(VITS_PRESET)], ["--time", "'2:00'"]),
    (["--dry-run", "--", "--config", str(VITS_PRESET), "optim.epochz=3"], ["optim.epochz"]),
    (["--dry-run", "--", "--config", str(VITS_PRESET), "optim.epochs=-1"], ["optim.epochs", "-1"]),
    (["--output-dir", "a", "--dry-run", "--", "--config", str(VITS_PRESET), "--output-dir", "b"],
     ["--output-dir", "'a'", "'b'"]),
    (["--task", "eval", "--nodes", "2", "--dry-run", "--", "knn", "--backbone", "b", "--data", "d"], ["--nodes 2"]),
    (["--task", "eval", "--dry-run"], ["evaluation arguments"]),
    (["--task", "eval", "--dry-run", "--", "knn", "--backbone", "b", "--data", "d", "knn.kk=3"], ["knn.kk"]),
    (["--task", "eval", "--output-dir", "a", "--dry-run", "--", "knn", "--backbone", "b", "--data", "d",
      "--output-dir", "b"], ["'a'", "'b'"]),
    (["--mem", "plenty", "--dry-run", "--", "--config", str(VITS_PRESET)], ["--mem", "'plenty'"]),
    (["--gpus-per-node", "4", "--dry-run", "--", "--config", str(VITS_PRESET)],
     ["4 processes", "compute.parallelism=ddp"]),
])
def test_bad_submissions_fail_before_slurm_naming_the_problem(argv, words, capsys):
    assert S.main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_training_arguments_before_the_separator_get_a_hint(capsys):
    with pytest.raises(SystemExit) as info:
        S.main(["--nodes", "2", "--config", str(VITS_PRESET)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--config" in err and "after '--'" in err


def test_extra_sbatch_arguments_and_setup_lines():
    submission = S.prepare_submission(["--sbatch-arg", "mail-type=END", "--sbatch-arg", "hint=nomultithread",
                                       "--sbatch-arg", "overcommit",
                                       "--setup", "module load cuda/12.4", "--dry-run", "--",
                                       "--config", str(VITS_PRESET)])
    script = S.render_sbatch(submission)
    assert "#SBATCH --mail-type=END" in script and "#SBATCH --hint=nomultithread" in script
    assert "#SBATCH --overcommit" in script.splitlines()  # a bare KEY is a flag
    assert script.index("module load cuda/12.4") < script.index("srun ")


def test_cpus_default_follows_data_workers():
    submission = S.prepare_submission(["--dry-run", "--", "--config", str(VITS_PRESET), "data.num_workers=6"])
    assert submission.slurm_parameters["cpus_per_task"] == 8


# ------------------------------------------------------------------------------------------------ real path
def _fake_slurm(tmp_path, monkeypatch, job_id="4242"):
    """`srun` and `sbatch` stand-ins: sbatch keeps a copy of the script it was given and prints a job id."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    copy = tmp_path / "received.sbatch"
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" "{copy}"\necho "Submitted batch job {job_id}"\n')
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return copy


def test_submission_through_submitit_matches_dry_run_and_records_the_job(tmp_path, monkeypatch, capsys):
    received = _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "run"
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "p", "--account", "acc", "--qos", "q",
            "--time", "60", "--output-dir", str(out), "--",
            "--config", str(VITS_PRESET), "train.batch_size_per_gpu=8", "compute.parallelism=fsdp"]
    expected_script = S.render_sbatch(S.prepare_submission(argv))

    assert S.main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted job 4242" in printed
    script = received.read_text()
    assert script == expected_script  # the dry run shows exactly what sbatch gets
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --nodes=2" in script

    # the run directory: frozen config (a complete preset) and the job record
    frozen = load_config(out / S.SUBMITTED_CONFIG)
    assert frozen.train.batch_size_per_gpu == 8 and frozen.student.arch == "vit_small"
    records = S.read_job_records(out)
    assert len(records) == 1
    record = records[0]
    assert (record["event"], record["job_id"], record["world_size"], record["tasks_per_node"]) == (
        "submitted", "4242", 8, 4)
    assert record["arguments"][-2:] == ["train.batch_size_per_gpu=8", "compute.parallelism=fsdp"]
    # submitit's pickle holds the TrainJob pointed at the frozen config, resume on
    from submitit.core.utils import DelayedSubmission

    pickled = DelayedSubmission.load(out / "slurm" / "4242" / "4242_submitted.pkl")
    job = pickled.function
    assert isinstance(job, S.TrainJob) and job.resume
    assert job.train_args == ["--config", str(out / S.SUBMITTED_CONFIG), "--output-dir", str(out)]
    assert pickled._timeout_countdown == S.DEFAULT_MAX_TIMEOUT_REQUEUES


def test_eval_submission_freezes_its_config_and_runs_one_task(tmp_path, monkeypatch, capsys):
    received = _fake_slurm(tmp_path, monkeypatch, job_id="777")
    out = tmp_path / "lin"
    argv = ["--task", "eval", "--gpus-per-node", "1", "--", "linear", "--backbone", "runs/x", "--data", "d",
            "--output-dir", str(out), "linear.iterations=50"]
    assert S.main(argv) == 0
    assert "#SBATCH --ntasks-per-node=1" in received.read_text()
    from dinov2_repro.eval.config import load_eval_config
    from submitit.core.utils import DelayedSubmission

    assert load_eval_config(out / S.SUBMITTED_EVAL_CONFIG).linear.iterations == 50
    job = DelayedSubmission.load(out / "slurm" / "777" / "777_submitted.pkl").function
    assert isinstance(job, S.EvalJob)
    assert job.eval_args == ["linear", "--backbone", "runs/x", "--data", "d", "--output-dir", str(out),
                             "linear.iterations=50", "--config", str(out / S.SUBMITTED_EVAL_CONFIG)]
    assert [r["event"] for r in S.read_job_records(out)] == ["submitted"]


def test_resubmission_keeps_a_different_earlier_config(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    out = tmp_path / "run"
    base = ["--output-dir", str(out), "--", "--config", str(VITS_PRESET)]
    assert S.main(base + ["optim.epochs=10"]) == 0
    assert S.main(base + ["optim.epochs=10"]) == 0  # identical: nothing to keep
    assert len(list(out.glob("submitted_config*.yaml"))) == 1
    assert S.main(base + ["optim.epochs=20"]) == 0
    configs = sorted(out.glob("submitted_config*.yaml"))
    assert len(configs) == 2
    assert load_config(out / S.SUBMITTED_CONFIG).optim.epochs == 20
    older = [c for c in configs if c.name != S.SUBMITTED_CONFIG][0]
    assert load_config(older).optim.epochs == 10
    assert [r["event"] for r in S.read_job_records(out)] == ["submitted"] * 3


def test_sbatch_refusal_is_reported(tmp_path, monkeypatch, capsys):
    _fake_slurm(tmp_path, monkeypatch)
    sbatch = tmp_path / "fakebin" / "sbatch"
    sbatch.write_text('#!/bin/sh\necho "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    argv = ["--partition", "nope", "--output-dir", str(tmp_path / "r"), "--", "--config", str(VITS_PRESET)]
    assert S.main(argv) == 2
    assert "sbatch refused the job" in capsys.readouterr().err
    assert S.read_job_records(tmp_path / "r") == []  # nothing was submitted, nothing recorded


def test_without_slurm_a_real_submission_explains_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere
    assert S.main(["--output-dir", str(tmp_path / "r"), "--", "--config", str(VITS_PRESET)]) == 2
    err = capsys.readouterr().err
    assert "srun" in err and "--dry-run" in err


def test_launch_script_wrapper_runs_the_same_main(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--dry-run", "--output-dir",
                             str(tmp_path / "w"), "--gpus-per-node", "2", "--", "--config", str(VITS_PRESET),
                             "compute.parallelism=ddp"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --ntasks-per-node=2" in result.stdout and "arch: vit_small" in result.stdout


# ------------------------------------------------------------------------------------------------ in the job
class _FakeJobEnv:
    """Duck-typed submitit JobEnvironment of a local 2-task job (only SUBMITIT_LOCAL_* variables are set)."""

    def __init__(self, global_rank, local_rank, num_tasks=2, num_nodes=1, job_id="31337"):
        self.global_rank, self.local_rank = global_rank, local_rank
        self.num_tasks, self.num_nodes = num_tasks, num_nodes
        self.job_id, self.hostnames = job_id, ["localhost"]


def test_local_multi_task_job_gets_torchrun_variables_the_engine_reads():
    environ = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1"}
    env = S.distributed_env_for_job(environ, _FakeJobEnv(global_rank=1, local_rank=1))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (1, 2, 1, 2, "torchrun")
    assert environ["MASTER_ADDR"] == "127.0.0.1" and environ["MASTER_PORT"] == str(20000 + 31337 % 20000)
    # both tasks agree on the rendezvous
    other = {}
    S.distributed_env_for_job(other, _FakeJobEnv(global_rank=0, local_rank=0))
    assert (other["MASTER_ADDR"], other["MASTER_PORT"]) == (environ["MASTER_ADDR"], environ["MASTER_PORT"])


def test_slurm_step_variables_are_left_to_the_engine():
    # srun already set the step variables: nothing is exported, the engine's SLURM detection is used
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
               "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]",
               "SLURM_JOB_ID": "777"}
    before = dict(environ)
    env = S.distributed_env_for_job(environ, _FakeJobEnv(global_rank=5, local_rank=1, num_tasks=8, num_nodes=2))
    assert environ == before
    assert (env.rank, env.world_size, env.local_world_size, env.master_addr, env.source) == (5, 8, 4, "gpu01", "slurm")


def test_single_task_job_stays_single_process():
    environ = {}
    env = S.distributed_env_for_job(environ, _FakeJobEnv(global_rank=0, local_rank=0, num_tasks=1))
    assert environ == {} and env.source == "single" and env.world_size == 1
