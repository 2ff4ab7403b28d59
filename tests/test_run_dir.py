"""The run directory's guarantees at its edges: one run at a time (lock), file-system errors as one line with the
last good checkpoint intact, and Ctrl-C / SIGTERM ending in a checkpoint from which the run resumes exactly."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from dinov2_repro.train import checkpoint as ckpt
from dinov2_repro.train import engine, loop
from dinov2_repro.train.engine import train
from dinov2_repro.train.run_dir import LOCK_FILE, RunDirError, RunLock
from dinov2_repro.train.signals import TrainingStopped
from test_engine_common import TINY, FixedLoader, tiny_cfg


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this PID until the kernel reuses it


def _write_lock(run, **holder):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps(dict(dict(host=socket.gethostname(), started="earlier"), **holder)))


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dinov2-repro train:")]
    assert len(lines) == 1, lines
    return lines[0]


def _teacher(run):
    state = torch.load(ckpt.latest_checkpoint(run), weights_only=False)["model"]
    return {k: v for k, v in state.items() if k.startswith("teacher.")}


# ------------------------------------------------------------------------------------------------ lock
def test_a_second_run_into_a_locked_directory_is_one_line_naming_the_holder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _write_lock(run, pid=os.getpid(), slurm_job_id="4242")  # a live process on this host
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    assert engine.main(["--output-dir", str(run), *TINY]) == 2
    line = _one_error_line(capsys)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line and "SLURM job 4242" in line
    assert "another --output-dir" in line
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()  # nothing was touched
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()  # the holder keeps its lock


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, caplog):
    run = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run, pid=dead)
    summary = train(tiny_cfg("train.max_iterations=2"), run, data_loader_fn=FixedLoader())
    assert summary["iterations"] == 2
    assert f"taking over the lock of a run that is gone (pid {dead}" in caplog.text
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    from dinov2_repro.train.run_dir import process_identity

    mine = process_identity(os.getpid())
    if mine is None:
        pytest.skip("no /proc here: process identities cannot be read")
    _write_lock(tmp_path, pid=os.getpid(), process="another-boot:12345")  # a restarted container reused the PID
    RunLock(tmp_path).acquire().release()
    _write_lock(tmp_path, pid=os.getpid(), process=mine)  # the very same process: alive
    with pytest.raises(RunDirError, match="in use by another training run"):
        RunLock(tmp_path).acquire()


def test_lock_on_another_host_cannot_be_checked_and_says_which_file_to_delete(tmp_path, monkeypatch):
    _write_lock(tmp_path, pid=1, host="some-other-node")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunDirError, match=f"pid 1 on some-other-node.*delete {tmp_path / LOCK_FILE}"):
        RunLock(tmp_path).acquire()
    # ... unless it is this very SLURM job, requeued after preemption onto another node
    _write_lock(tmp_path, pid=1, host="some-other-node", slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ OSError
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                         capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    assert engine.main(["--output-dir", str(run), *TINY, "train.max_iterations=2"]) == 0
    good = ckpt.latest_checkpoint(run)
    good_bytes = good.read_bytes()
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        if "checkpoint_" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    assert engine.main(["--output-dir", str(run), *TINY, "train.max_iterations=4"]) == 2
    line = _one_error_line(capsys)
    assert "cannot write a checkpoint" in line and "No space left on device" in line and "checkpoints" in line
    assert ckpt.latest_checkpoint(run) == good and good.read_bytes() == good_bytes
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []
    assert not (run / LOCK_FILE).exists()


def test_a_read_only_run_directory_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    run.mkdir()
    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(loop, "default_data_loader", FixedLoader())
    assert engine.main(["--output-dir", str(run), *TINY]) == 2
    line = _one_error_line(capsys)
    assert "Read-only file system" in line and str(run / LOCK_FILE) in line


# ------------------------------------------------------------------------------------------------ signals
class SignalAt(FixedLoader):
    """FixedLoader that delivers ``signum`` to this process while fetching the batch of iteration ``at``."""

    def __init__(self, at: int, signum=signal.SIGINT, twice: bool = False):
        super().__init__()
        self.at, self.signum, self.twice = at, signum, twice

    def __call__(self, cfg, rank, world, start_batch):
        for i, batch in enumerate(super().__call__(cfg, rank, world, start_batch), start=start_batch):
            if i == self.at:
                signal.raise_signal(self.signum)
                if self.twice:
                    signal.raise_signal(self.signum)
            yield batch


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, signum):
    cfg = tiny_cfg("train.max_iterations=5", "checkpoint.period_iterations=100")
    whole = tmp_path / "whole"
    train(cfg, whole, data_loader_fn=FixedLoader())
    cut = tmp_path / "cut"
    with pytest.raises(TrainingStopped) as info:
        train(cfg, cut, data_loader_fn=SignalAt(at=2, signum=signum))
    assert info.value.iteration == 3  # the batch of iteration 2 (0-based) was trained, then it stopped
    assert info.value.exit_code == 128 + signum
    assert ckpt.latest_checkpoint(cut).name == "checkpoint_0000003.pth"
    assert not (cut / LOCK_FILE).exists()
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers restored
    train(cfg, cut, data_loader_fn=FixedLoader())
    expected, got = _teacher(whole), _teacher(cut)
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)


def test_ctrl_c_at_the_cli_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "default_data_loader", SignalAt(at=1))
    assert engine.main(["--output-dir", str(tmp_path / "run"), *TINY, "checkpoint.period_iterations=100"]) == 130
    line = _one_error_line(capsys)
    assert "stopped by SIGINT after iteration 2" in line and "checkpoint_0000002.pth" in line and "resume" in line


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(), tmp_path / "run", data_loader_fn=SignalAt(at=1, twice=True))
    assert not (tmp_path / "run" / LOCK_FILE).exists()
