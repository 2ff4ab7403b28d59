"""The run directory: its lock, the resolved config, the summary and the exported backbone.

    run.lock          who trains here now: PID, host, SLURM job (removed at exit; a dead holder's is taken over)
    config.yaml       resolved config (restart with --config run/config.yaml alone)
    summary.json      iterations, final losses, images/s, skipped files
    export/           teacher_backbone.pth (hub layout, strict-loadable) + backbone.json (`models.weights`)

Every write names what it was writing when the file system refuses it (`RunDirError`), so a read-only
directory or a full disk ends as one line, and the files written before stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..files import write_text_atomic

log = logging.getLogger("dinov2_repro.train")

EXPORT_DIR = "export"
LOCK_FILE = "run.lock"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


class RunDirError(RuntimeError):
    """The run directory cannot be used: locked by another run, or a write the file system refused."""


@contextlib.contextmanager
def writing(what: str, path: os.PathLike) -> Iterator[None]:
    """Turn an `OSError` while writing ``what`` at ``path`` into one `RunDirError` line naming both."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        raise RunDirError(f"cannot write {what} to {where}: {exc.strerror or exc}") from exc


def write_text_named(path: Path, text: str, what: str) -> None:
    """`files.write_text_atomic`, with a refused write named as ``what`` (see `writing`)."""
    with writing(what, path):
        write_text_atomic(path, text)


# ------------------------------------------------------------------------------------------------ lock
def process_identity(pid: int) -> Optional[str]:
    """Boot id and start time of a process (Linux): tells a live holder from a new process that reuses its PID
    (a restarted container often gets the same small PIDs). None where /proc cannot tell."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + ":" + start
    except (OSError, IndexError):
        return None


def _holder_alive(holder: Dict[str, Any]) -> Optional[bool]:
    """True/False when this machine can tell whether the lock's holder still runs; None when it cannot."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return False  # this very job, requeued after preemption: the earlier holder is gone
    if holder.get("host") != socket.gethostname():
        return None
    try:
        pid = int(holder.get("pid", -1))
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True  # another user's live process (or a malformed PID: be safe)
    recorded, now = holder.get("process"), process_identity(pid)
    return not (recorded and now and recorded != now)  # the PID lives on in another process: the holder is gone


class RunLock:
    """An exclusive lock on a run directory: ``run.lock`` created with O_EXCL, holding PID, host and SLURM job.

    A second run into the same directory fails with one line naming the holder. A lock whose holder is dead
    (same host and no such PID, or the PID now belongs to another process; or the same SLURM job, requeued) is
    taken over with a warning. On another host
    liveness cannot be checked, so the message says which file to delete if that run is gone.
    """

    def __init__(self, run_dir: os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _read_holder(self) -> Dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "process": process_identity(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return True

    def acquire(self) -> "RunLock":
        with writing("the run lock", self.path):
            for _ in range(3):  # a lock removed between our attempts: try again
                if self._create():
                    self.held = True
                    return self
                holder = self._read_holder()
                alive = _holder_alive(holder)
                if alive is False:
                    log.warning("%s: taking over the lock of a run that is gone (pid %s on %s)", self.path,
                                holder.get("pid"), holder.get("host"))
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
                if holder.get("slurm_job_id"):
                    who += f", SLURM job {holder['slurm_job_id']}"
                hint = "" if alive else f" (cannot check from here; if that run is gone, delete {self.path})"
                raise RunDirError(f"{self.path.parent} is in use by another training run ({who}, since "
                                  f"{holder.get('started', '?')}){hint}; use another --output-dir")
        raise RunDirError(f"{self.path}: could not take the lock after 3 attempts")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ------------------------------------------------------------------------------------------------ config
def resolved_for_run(cfg, run_dir: Path):
    """A copy of ``cfg`` that restarts this run from any working directory: train.output_dir is the run
    directory actually used, data.path and student.pretrained_weights are absolute."""
    from omegaconf import OmegaConf

    update: Dict[str, Any] = {"train": {"output_dir": str(run_dir)}}
    if cfg.data.path and "://" not in str(cfg.data.path):
        update["data"] = {"path": str(Path(cfg.data.path).absolute())}
    if cfg.student.pretrained_weights:
        update["student"] = {"pretrained_weights": str(Path(cfg.student.pretrained_weights).absolute())}
    cfg = OmegaConf.merge(cfg, update)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old_path: Path, cfg) -> List[str]:
    """``key: old -> new`` for every key whose value differs between ``old_path`` and ``cfg``."""
    from omegaconf import OmegaConf

    from dinov2_repro.config import config_to_dict

    old = _flat(OmegaConf.to_container(OmegaConf.load(old_path), resolve=True))
    new = _flat(config_to_dict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def write_config(cfg, run_dir: Path, resuming: bool) -> None:
    """Write ``config.yaml``; when resuming, warn about every key that changed since the run began."""
    from omegaconf import OmegaConf

    path = run_dir / CONFIG_FILE
    if path.exists() and resuming:
        changed = config_differences(path, cfg)
        if changed:
            log.warning("config.yaml differs from the run being resumed: %s", "; ".join(changed))
    write_text_named(path, OmegaConf.to_yaml(cfg, resolve=True), "the resolved config")


# ------------------------------------------------------------------------------------------------ summary, export
def write_summary(run_dir: Path, summary: Dict[str, Any]) -> None:
    write_text_named(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n", "the run summary")


def read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def export_teacher_backbone(meta_arch, cfg, run_dir: Path, iteration: int, is_main: bool) -> Optional[Path]:
    """Write the teacher backbone in hub layout with its sidecar (`models.weights.write_export`).

    Collective under FSDP (the shards are gathered to rank 0); rank 0 writes, atomically.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dinov2_repro.models.weights import sidecar_description, write_export

    backbone = meta_arch.teacher["backbone"]
    state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    description = sidecar_description(backbone, state, arch=cfg.student.arch, ffn_layer=cfg.student.ffn_layer,
                                      layerscale=cfg.student.layerscale, iteration=iteration)
    with writing("the exported teacher backbone", run_dir / EXPORT_DIR):
        return write_export(run_dir / EXPORT_DIR, state, description)
