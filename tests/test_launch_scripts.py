"""launch/torchrun.sh and launch/sbatch_torchrun.sh: the commands they build (fake srun/scontrol/torchrun)."""

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH_SH = REPO / "launch" / "sbatch_torchrun.sh"


def _run(args, env=None, **kw):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, env=full_env, timeout=60, **kw)


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# ------------------------------------------------------------------------------------------------ torchrun.sh
def test_torchrun_single_node_is_standalone():
    result = _run([TORCHRUN_SH, "--dry-run", "--gpus", "4", "--", "--config", "my cfg.yaml", "optim.epochs=5"],
                  env={"TORCHRUN": "torchrun"})
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)  # the printed command is shell-quoted: it round-trips
    assert words[:3] == ["torchrun", "--standalone", "--nnodes=1"]
    assert "--nproc-per-node=4" in words and "--rdzv-backend=c10d" not in words
    tail = words[words.index("-m"):]
    assert tail == ["-m", "dinov2_repro.train", "--config", "my cfg.yaml", "optim.epochs=5", "--resume"]
    assert "world size 4" in result.stderr


def test_torchrun_multi_node_uses_c10d_rendezvous_and_keeps_one_resume():
    result = _run([TORCHRUN_SH, "--dry-run", "--nnodes", "4", "-g", "8", "--rdzv-endpoint", "node001:29400",
                   "--rdzv-id", "vitl-run1", "--max-restarts", "2", "--", "--config", "c.yaml", "--resume"],
                  env={"TORCHRUN": "python -m torch.distributed.run"})
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[:3] == ["python", "-m", "torch.distributed.run"]
    for flag in ["--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node001:29400",
                 "--rdzv-id=vitl-run1", "--max-restarts=2"]:
        assert flag in words, flag
    assert "--standalone" not in words and words.count("--resume") == 1
    assert "world size 32" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--", "--config", "c.yaml"], "needs --rdzv-endpoint"),
    (["--nnodes", "2", "--rdzv-endpoint", "node1", "--", "x=1"], "HOST:PORT"),
    (["--gpus", "0", "--", "x=1"], "--gpus '0'"),
    (["--rdzv-endpoint", "h:1", "--", "x=1"], "only for several nodes"),
    (["--config", "c.yaml"], "unknown option '--config'"),
    ([], "no training arguments"),
])
def test_torchrun_usage_errors(args, message):
    result = _run([TORCHRUN_SH, "--dry-run", *args])
    assert result.returncode == 2
    assert message in result.stderr


def test_torchrun_help():
    result = _run([TORCHRUN_SH, "--help"])
    assert result.returncode == 0 and "usage: launch/torchrun.sh" in result.stdout


# ------------------------------------------------------------------------------------------------ sbatch script
@pytest.fixture()
def fake_slurm(tmp_path):
    """Fake `scontrol` (host list, requeue log) and `srun` (records its argv, then runs a short sleep)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    log.mkdir()
    _executable(bin_dir / "scontrol", f"""#!/bin/bash
# a long host list: the script must read all of it (an early close would SIGPIPE scontrol under pipefail)
if [ "$1 $2" = "show hostnames" ]; then printf 'node007\\nnode008\\n'; seq -f 'node%05g' 9 20000; exit 0; fi
echo "$@" >> "{log}/scontrol"
""")
    _executable(bin_dir / "srun", f"""#!/bin/bash
printf '%s\\n' "$@" > "{log}/srun"
sleep "${{FAKE_SRUN_SECONDS:-0}}"
exit "${{FAKE_SRUN_STATUS:-0}}"
""")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "node[007-008]",
           "TORCHRUN": "torchrun", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_PER_TASK": "48"}
    env.pop("MASTER_PORT", None)
    return env, log


def test_sbatch_script_runs_one_srun_task_per_node_with_torchrun(fake_slurm):
    env, log = fake_slurm
    result = _run([SBATCH_SH, "--config", "configs/train/vitb14_8gpu.yaml", "data.path=/d"], env=env)
    assert result.returncode == 0, result.stderr
    argv = (log / "srun").read_text().splitlines()
    assert argv[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=48"]
    assert argv[3] == "torchrun"
    port = 20000 + 123456 % 20000
    for flag in ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=node007:{port}", "--rdzv-id=123456"]:
        assert flag in argv, flag
    assert argv[argv.index("-m"):] == ["-m", "dinov2_repro.train", "--config", "configs/train/vitb14_8gpu.yaml",
                                       "data.path=/d", "--resume"]
    assert "world size 8" in result.stdout
    assert not (log / "scontrol").exists()  # no requeue without a signal


def test_sbatch_script_passes_the_srun_exit_status(fake_slurm):
    env, _ = fake_slurm
    result = _run([SBATCH_SH, "--config", "c.yaml"], env=dict(env, FAKE_SRUN_STATUS="3"))
    assert result.returncode == 3


def test_sbatch_script_requeues_on_usr2(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.Popen(["bash", str(SBATCH_SH), "--config", "c.yaml"], env=dict(os.environ, **env,
                            FAKE_SRUN_SECONDS="3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log / "srun").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (log / "srun").exists(), "srun was never started"
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out, err)  # the trap ran and the script went on waiting for srun
    assert (log / "scontrol").read_text().split() == ["requeue", "123456"]
    assert "requeueing job 123456" in out


def test_sbatch_script_outside_slurm_refuses():
    env = dict(os.environ)
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(SBATCH_SH), "--config", "c.yaml"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 2 and "sbatch" in result.stderr
