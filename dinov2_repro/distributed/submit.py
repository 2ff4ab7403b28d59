"""`dinov2-repro submit`: send pretraining (or an evaluation) to SLURM through submitit, preemption-safe.

How a run moves through SLURM::

    dinov2-repro submit --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        -- --config configs/train/vitb14_8gpu.yaml data.path=/datasets/mri

1. On the login node: the training arguments after ``--`` are resolved into a validated config (a bad key
   fails here, not after hours in the queue). The resolved config is frozen into
   ``<run>/submitted_config.yaml`` and the job trains from that file, so editing a preset while the job
   waits changes nothing. The job id is appended to ``<run>/slurm_jobs.jsonl``.
2. In the job: submitit starts one task per GPU (``--ntasks-per-node = --gpus-per-node``) through srun; each
   task runs `TrainJob`, which reads its rank from the SLURM step variables (the engine's `detect_env`),
   prints world size, ranks and the effective batch, and calls ``train(cfg, output_dir, resume=True)``.
3. On preemption or time-out SLURM sends USR2 (``--signal=USR2@90``); submitit calls `TrainJob.checkpoint`
   on rank 0, which returns the same job with ``resume=True``; submitit requeues it and the new run resumes
   from ``<run>/checkpoints/latest`` with the same schedule and data order.

``--dry-run`` prints the exact sbatch script submitit would submit and the resolved config; it needs no
SLURM. submitit is imported at the top of this module: the module is only imported for ``submit`` and
by jobs, never by ``import dinov2_repro``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

SUBMITTED_CONFIG = "submitted_config.yaml"
SUBMITTED_EVAL_CONFIG = "submitted_eval_config.yaml"
JOBS_LOG = "slurm_jobs.jsonl"
SLURM_LOG_FOLDER = "slurm"  # submitit's logs and pickles: <run>/slurm/<job id>_<task>_log.{out,err}
DEFAULT_TIME_MIN = 24 * 60
DEFAULT_MAX_TIMEOUT_REQUEUES = 10


class SubmitError(ValueError):
    """A submission option or a training argument that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------------------------
# Parsing SLURM resource options


def parse_time_minutes(text: str) -> int:
    """SLURM wall time -> whole minutes (rounded up): ``90``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    ``A:B`` alone is refused: SLURM reads it as minutes:seconds, most people mean hours:minutes.
    """
    value = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match or not value:
        raise SubmitError(f"--time {text!r}: use minutes (90), HH:MM:SS (01:30:00) or D-HH:MM:SS (1-12:00:00)")
    days, first, second, third = match.groups()
    if days is None and second is not None and third is None:
        raise SubmitError(f"--time {text!r} is ambiguous (SLURM reads A:B as minutes:seconds); "
                          "write HH:MM:SS, e.g. 02:00:00, or plain minutes")
    if days is None and second is None:
        minutes = int(first)
        seconds = 0
    elif days is None:
        minutes, seconds = int(first) * 60 + int(second), int(third)
    else:
        hours = int(first)
        minutes = int(days) * 24 * 60 + hours * 60 + int(second or 0)
        seconds = int(third or 0)
    total = minutes + math.ceil(seconds / 60)
    if total < 1:
        raise SubmitError(f"--time {text!r} must be at least one minute")
    return total


def parse_mem(text: str) -> str:
    """Memory per node in SLURM syntax: ``64G``, ``64GB``, ``500M``, ``1T``; a bare number means GB; ``0`` = all."""
    value = str(text).strip().upper()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT])?B?", value)
    if not match:
        raise SubmitError(f"--mem {text!r}: use e.g. 64G, 500M or 0 (all the node's memory)")
    number, unit = match.groups()
    if unit is None:
        unit = "G"  # SLURM's own default unit is MB; a bare number here means GB, as people usually intend
    if "." in number:  # SLURM wants integers: go one unit down
        lower = {"T": "G", "G": "M", "M": "K"}
        if unit not in lower:
            raise SubmitError(f"--mem {text!r}: fractional kilobytes are not a thing")
        number, unit = str(int(float(number) * 1024)), lower[unit]
    return f"{int(number)}{unit}"


def _parse_sbatch_extra(items: Sequence[str]) -> Dict[str, Any]:
    """``--sbatch-arg mail-type=END --sbatch-arg requeue`` -> {"mail_type": "END", "requeue": True}."""
    extra: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise SubmitError(f"--sbatch-arg {item!r}: expected KEY=VALUE or KEY")
        extra[key] = value if sep else True
    return extra


# --------------------------------------------------------------------------------------------------------------
# The training / evaluation arguments after "--"


@dataclass
class TrainRequest:
    """What ``dinov2-repro train --config X.yaml [--output-dir DIR] [--resume|--no-resume] [key=value ...]`` asks."""

    config: Optional[str] = None
    output_dir: Optional[str] = None
    resume: bool = True
    overrides: List[str] = field(default_factory=list)


def parse_train_args(train_args: Sequence[str]) -> TrainRequest:
    """Parse training arguments with the engine CLI's own parser; anything it does not know is an error naming it."""
    from dinov2_repro.train.engine import build_parser as engine_parser

    known, unknown = engine_parser().parse_known_args(list(train_args))
    bad = list(unknown) + [o for o in known.overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise SubmitError(f"training arguments after '--': cannot use {bad}; expected "
                          "--config FILE, --output-dir DIR, --resume/--no-resume and key=value overrides")
    return TrainRequest(known.config, known.output_dir, known.resume, list(known.overrides))


def resolve_train_config(request: TrainRequest):
    """The validated config the engine will see (raises the config loader's errors, naming key and file)."""
    from dinov2_repro.config import load_config

    return load_config(request.config, request.overrides)


def effective_batch_and_lr(cfg, world_size: int) -> Tuple[int, float, str]:
    """(global batch, scaled peak lr, human-readable formula) for ``world_size`` processes.

    Global batch = batch_size_per_gpu x world size x grad_accum_steps; the lr is ``optim.base_lr`` scaled by
    ``optim.scaling_rule`` (sqrt w.r.t. 1024 in DINOv2, linear w.r.t. 256 in DINO v1, or none).
    """
    from dinov2_repro.train.schedules import scaled_lr

    per_gpu, accum = int(cfg.train.batch_size_per_gpu), int(cfg.train.grad_accum_steps)
    batch = per_gpu * world_size * accum
    base, rule = float(cfg.optim.base_lr), str(cfg.optim.scaling_rule)
    lr = scaled_lr(base, batch, rule)  # the engine's own rule, so the print matches what it trains with
    formula = {"sqrt_wrt_1024": f"{base:g} x sqrt({batch}/1024)", "linear_wrt_256": f"{base:g} x {batch}/256"}.get(
        rule, f"{base:g} (scaling_rule none)")
    text = (f"effective batch {batch} = {per_gpu} per GPU x {world_size} processes x {accum} accumulation "
            f"steps; peak lr {lr:.6g} = {formula}")
    return batch, lr, text


# --------------------------------------------------------------------------------------------------------------
# Inside the job


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def append_job_record(output_dir: os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``<run>/slurm_jobs.jsonl`` (the run's history of submissions and restarts)."""
    path = Path(output_dir) / JOBS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(record), sort_keys=True) + "\n")
        handle.flush()


def read_job_records(output_dir: os.PathLike) -> List[Dict[str, Any]]:
    path = Path(output_dir) / JOBS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _submitit_job_environment():
    """submitit's `JobEnvironment` when this process is a submitit job (SLURM, local or debug), else None."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # "could not figure out which environment the job is running in"
        return None


def distributed_env_for_job(environ: Dict[str, str], job_env=None):
    """The `DistEnv` of this task, translating submitit's own variables when the engine cannot see them.

    Under SLURM, srun sets ``SLURM_PROCID``/``SLURM_NTASKS``/... in a job step and the engine's `detect_env`
    reads them directly. submitit's *local* executor only sets ``SUBMITIT_LOCAL_*``; for several local tasks
    we export the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) into ``environ`` so that the engine, which reads the same mapping, finds the same ranks.
    """
    from dinov2_repro.distributed.env import SLURM_PORT_BASE, SLURM_PORT_SPAN, detect_env

    env = detect_env(environ)
    if job_env is None or job_env.num_tasks <= 1 or env.world_size == job_env.num_tasks:
        return env
    digits = re.sub(r"\D", "", str(job_env.job_id)) or "0"
    environ.update({
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // max(1, job_env.num_nodes)),
        "MASTER_ADDR": "127.0.0.1" if job_env.num_nodes == 1 else str(job_env.hostnames[0]),
        "MASTER_PORT": str(SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN),
    })
    return detect_env(environ)


def startup_report(cfg, dist_env, output_dir: os.PathLike) -> str:
    """The lines every job prints first: who am I, how many of us, and the batch / lr that follow."""
    lines = [f"[dinov2-repro job] host {socket.gethostname()}: rank {dist_env.rank} of world size "
             f"{dist_env.world_size} (local rank {dist_env.local_rank} of {dist_env.local_world_size}, "
             f"launcher {dist_env.source}, rendezvous {dist_env.master_addr}:{dist_env.master_port})"]
    if dist_env.is_main:
        _, _, text = effective_batch_and_lr(cfg, dist_env.world_size)
        lines.append(f"[dinov2-repro job] {text}")
        lines.append(f"[dinov2-repro job] run directory {Path(output_dir).resolve()}")
    return "\n".join(lines)


def resume_point(output_dir: os.PathLike) -> Optional[Path]:
    """The checkpoint a resumed run starts from (``<run>/checkpoints/latest``), or None for a fresh run.

    Never raises: it is called from submitit's signal handler, where an exception would lose the requeue.
    """
    from dinov2_repro.train.checkpoint import latest_checkpoint

    try:
        return latest_checkpoint(output_dir)
    except Exception as exc:  # a dangling pointer: the engine reports it properly when it resumes
        print(f"[dinov2-repro job] warning: cannot read the latest checkpoint of {output_dir}: {exc}", flush=True)
        return None


def _job_record(job_env, dist_env, event: str, output_dir: Path) -> Dict[str, Any]:
    record: Dict[str, Any] = {"event": event, "time": _now(), "host": socket.gethostname()}
    if job_env is not None:
        record.update(job_id=str(job_env.job_id), array_job_id=job_env.array_job_id,
                      array_task_id=job_env.array_task_id, cluster=job_env.cluster)
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    # SLURM counts requeues of the same job id; "attempt" also works for the local executor.
    record["restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if dist_env is not None:
        record["world_size"] = dist_env.world_size
    if event == "started":
        earlier = [r for r in read_job_records(output_dir)
                   if r.get("event") == "started" and r.get("job_id") == record.get("job_id")]
        record["attempt"] = len(earlier) + 1
    return record


class TrainJob(Checkpointable):
    """Pretraining as a submitit job that survives preemption and time-outs.

    ``TrainJob(train_args)`` takes the engine CLI's arguments (``--config FILE --output-dir DIR key=value ...``).
    Calling it, in every task of the job: reads the task's rank (SLURM step variables via the engine's
    `detect_env`; submitit's local variables are translated), prints world size, ranks and effective batch,
    records the job id and attempt in ``<run>/slurm_jobs.jsonl`` (rank 0), and runs
    ``train(cfg, output_dir, resume=self.resume)``.

    `checkpoint` (called by submitit on rank 0 when SLURM signals preemption or the time limit) does NOT save
    anything itself: the signal interrupts the training step at an arbitrary point, only rank 0 receives the
    call and the other ranks keep running, so a collective (FSDP/DDP) save cannot happen there. Instead the
    engine's periodic checkpoints (``checkpoint.period_iterations``) are the source of truth, and
    `checkpoint` returns this job pointed at the same run directory with ``resume=True``: the requeued job
    resumes from ``<run>/checkpoints/latest`` with the same schedule and data order, losing at most one
    checkpoint period of work. Pick the period so that this loss is acceptable (e.g. 15-30 minutes of training).
    """

    def __init__(self, train_args: Sequence[str], resume: bool = True) -> None:
        self.train_args = [str(a) for a in train_args]
        self.resume = bool(resume)

    def _request_and_config(self):
        request = parse_train_args(self.train_args)
        cfg = resolve_train_config(request)
        output_dir = Path(request.output_dir or cfg.train.output_dir).absolute()
        return request, cfg, output_dir

    def __call__(self) -> Dict[str, Any]:
        _, cfg, output_dir = self._request_and_config()
        job_env = _submitit_job_environment()
        dist_env = distributed_env_for_job(os.environ, job_env)  # os.environ: the engine reads it too
        print(startup_report(cfg, dist_env, output_dir), flush=True)
        if dist_env.is_main:
            append_job_record(output_dir, _job_record(job_env, dist_env, "started", output_dir))

        from dinov2_repro.train.engine import train

        summary = train(cfg, output_dir=str(output_dir), resume=self.resume)
        if dist_env.is_main:
            append_job_record(output_dir, _job_record(job_env, dist_env, "finished", output_dir))
        return summary

    def requeue_args(self) -> List[str]:
        """The same training arguments with the run directory pinned (absolute), for the requeued job."""
        request, _, output_dir = self._request_and_config()
        args: List[str] = []
        if request.config:
            args += ["--config", str(Path(request.config).absolute())]
        args += ["--output-dir", str(output_dir)]
        return args + list(request.overrides)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Return this job with ``resume=True`` for submitit to requeue; log which checkpoint it will resume from."""
        _, _, output_dir = self._request_and_config()
        resume_from = resume_point(output_dir)
        record = _job_record(_submitit_job_environment(), None, "requeue", output_dir)
        record["resume_from"] = str(resume_from) if resume_from else None
        append_job_record(output_dir, record)
        print(f"[dinov2-repro job] preempted or timed out: requeueing; the next run resumes from "
              f"{resume_from or 'the beginning (no checkpoint written yet)'}", flush=True)
        return DelayedSubmission(self.__class__(self.requeue_args(), resume=True))


class EvalJob(Checkpointable):
    """An evaluation (``dinov2-repro eval ...``) as a submitit job; on a time-out it is rerun from the start."""

    def __init__(self, eval_args: Sequence[str]) -> None:
        self.eval_args = [str(a) for a in eval_args]

    def __call__(self) -> int:
        from dinov2_repro.eval.cli import main as eval_main

        print(f"[dinov2-repro job] host {socket.gethostname()}: dinov2-repro eval {shlex.join(self.eval_args)}",
              flush=True)
        status = eval_main(list(self.eval_args))
        if status:
            raise RuntimeError(f"dinov2-repro eval {shlex.join(self.eval_args)} exited with status {status}")
        return 0


# --------------------------------------------------------------------------------------------------------------
# The submission side


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov2-repro submit",
        usage="dinov2-repro submit [options] -- [dinov2-repro train arguments | dinov2-repro eval arguments]",
        description="Submit pretraining (default) or an evaluation to SLURM through submitit. Training runs one "
                    "task per GPU, requeues itself on preemption/time-out and resumes from its last checkpoint. "
                    "Everything after '--' goes to `dinov2-repro train` (or `dinov2-repro eval`).",
        epilog="example: dinov2-repro submit --nodes 1 --gpus-per-node 8 --partition gpu --time 24:00:00 "
               "-- --config configs/train/vitb14_8gpu.yaml data.path=/datasets/brain_mri",
    )
    parser.add_argument("--task", choices=("train", "eval", "wsi_tile"), default="train",
                        help="what to run (default: train); wsi_tile: `dinov2-repro wsi tile` as a job array, "
                             "each task tiling every N-th slide (resumable per slide)")
    parser.add_argument("--array-tasks", type=int, default=0,
                        help="--task wsi_tile: array size (default: one task per slide, at most 256)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1,
                        help="GPUs per node; training runs one task per GPU (default 1; 0 = a CPU-only job, "
                             "one task per node)")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account to charge")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--time", default=str(DEFAULT_TIME_MIN),
                        help="wall time per job: minutes or HH:MM:SS or D-HH:MM:SS (default 24:00:00); "
                             "a training job that hits it is requeued and resumes")
    parser.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. 'a100|h100'")
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 256G (bare numbers are GB); "
                                                      "0 = all of it")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPUs per task (default: data.num_workers + 2 for training, 10 for eval)")
    parser.add_argument("--exclusive", action="store_true", help="ask for whole nodes")
    parser.add_argument("--comment", default=None, help="SLURM job comment")
    parser.add_argument("--job-name", default=None, help="default: dinov2-<task>-<run directory name>")
    parser.add_argument("--output-dir", default=None,
                        help="run directory (default: the training --output-dir, else train.output_dir)")
    parser.add_argument("--max-timeout-requeues", type=int, default=DEFAULT_MAX_TIMEOUT_REQUEUES,
                        help="how many times a job that hits --time is requeued (preemptions do not count; "
                             f"default {DEFAULT_MAX_TIMEOUT_REQUEUES})")
    parser.add_argument("--setup", action="append", default=[], metavar="CMD",
                        help="shell line run in the sbatch script before srun (repeatable), e.g. "
                             "'module load cuda/12.4'")
    parser.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY[=VALUE]",
                        help="any other sbatch option (repeatable), e.g. --sbatch-arg mail-type=END")
    parser.add_argument("--python", default=None,
                        help="python command in the job (default: this interpreter, %s)" % sys.executable)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script and the resolved config; submit nothing (no SLURM needed)")
    return parser


def split_argv(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split at the first ``--``: submission options before it, training/eval arguments after it."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


@dataclass
class Submission:
    """Everything a submission needs, resolved and validated, before anything touches SLURM or the disk."""

    task: str
    output_dir: Path
    slurm_parameters: Dict[str, Any]  # SlurmExecutor's own parameter names
    max_timeout_requeues: int
    python: Optional[str]
    job: Any  # TrainJob, EvalJob, or a list of WsiTileJob (one SLURM array)
    cfg: Any = None  # the resolved config (SSL, or eval for --task eval); wsi_tile: {slides, array_tasks}
    passthrough: List[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def folder(self) -> Path:
        """submitit's folder for pickles and logs; ``%j`` becomes the job id."""
        return self.output_dir / SLURM_LOG_FOLDER / "%j"

    @property
    def world_size(self) -> int:
        return int(self.slurm_parameters["nodes"]) * int(self.slurm_parameters["ntasks_per_node"])


def _slurm_native_keys() -> set:
    from submitit.slurm.slurm import SlurmExecutor

    return set(SlurmExecutor._valid_parameters())


def slurm_parameters(args: argparse.Namespace, task: str, cpus_default: int, job_name: str) -> Dict[str, Any]:
    """The submitit SlurmExecutor parameters (its own names) for the parsed options.

    Training: ``ntasks_per_node = gpus_per_node`` (one process per GPU). Eval: one task on one node.
    Options this submitit version has no key for go through ``additional_parameters`` verbatim.
    """
    if args.nodes < 1:
        raise SubmitError(f"--nodes {args.nodes}: must be >= 1")
    if args.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node {args.gpus_per_node}: must be >= 0")
    if task != "train" and args.nodes != 1:
        raise SubmitError(f"--nodes {args.nodes}: --task {task} runs as one process on one node; use --nodes 1")
    cpus = args.cpus_per_task if args.cpus_per_task is not None else cpus_default
    if cpus < 1:
        raise SubmitError(f"--cpus-per-task {cpus}: must be >= 1")
    params: Dict[str, Any] = {
        "job_name": job_name,
        "nodes": args.nodes,
        "ntasks_per_node": max(1, args.gpus_per_node) if task == "train" else 1,
        "cpus_per_task": cpus,
        "time": parse_time_minutes(args.time),
    }
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    optional = {"partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint, "comment": args.comment,
                "mem": parse_mem(args.mem) if args.mem is not None else None,
                "exclusive": True if args.exclusive else None}
    extra: Dict[str, Any] = {}
    if task == "train":
        # Let `scontrol requeue` work where the cluster default is JobRequeue=0, and have SLURM itself requeue
        # the job after a node failure; either way the job resumes from its last checkpoint.
        extra["requeue"] = True
    extra.update(_parse_sbatch_extra(args.sbatch_arg))
    native = _slurm_native_keys()
    for key, value in optional.items():
        if value is None:
            continue
        if key in native:
            params[key] = value
        else:  # older submitit without this key: pass it to sbatch as is
            extra.setdefault(key, value)
    setup = list(args.setup)
    # SLURM 22.05-23.02: srun no longer inherits --cpus-per-task from sbatch, and every task (with its data
    # loader workers) would be pinned to one CPU. Restating it on srun is right for every SLURM version.
    if "srun_args" in native:
        params["srun_args"] = [f"--cpus-per-task={cpus}"]
    else:
        setup.append(f"export SRUN_CPUS_PER_TASK={cpus}")
    if setup:
        params["setup"] = setup
    if extra:
        params["additional_parameters"] = extra
    return params


def prepare_submission(argv: Sequence[str]) -> Submission:
    """Parse and validate everything (config included) without touching SLURM or the disk."""
    submit_argv, passthrough = split_argv(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(submit_argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (training or eval arguments go after '--', "
                     "e.g. -- --config configs/train/vits14_brain_mri.yaml optim.epochs=50)")
    if args.max_timeout_requeues < 0:
        raise SubmitError(f"--max-timeout-requeues {args.max_timeout_requeues}: must be >= 0")

    if args.task == "train":
        request = parse_train_args(passthrough)
        if args.output_dir and request.output_dir and Path(args.output_dir).absolute() != Path(
                request.output_dir).absolute():
            raise SubmitError(f"--output-dir given twice with different values: {args.output_dir!r} (submit) and "
                              f"{request.output_dir!r} (training arguments)")
        cfg = resolve_train_config(request)
        output_dir = Path(args.output_dir or request.output_dir or cfg.train.output_dir).absolute()
        existing = resume_point(output_dir)
        if not request.resume and existing is not None:
            # The job itself always resumes (a requeue must continue), so --no-resume is enforced here.
            raise SubmitError(f"--no-resume but {output_dir} already holds checkpoints (latest: {existing.name}); "
                              "choose another --output-dir, or drop --no-resume to continue that run")
        # The job trains from the frozen config; nothing else is needed on its command line.
        job = TrainJob(["--config", str(output_dir / SUBMITTED_CONFIG), "--output-dir", str(output_dir)],
                       resume=True)
        cpus_default = int(cfg.data.num_workers) + 2
    elif args.task == "wsi_tile":
        from dinov2_repro.wsi.slurm import prepare_tile_array

        output_dir, job, n_slides = prepare_tile_array(passthrough, args.array_tasks)
        cfg, cpus_default = {"slides": n_slides, "array_tasks": len(job)}, 4
    else:
        if not passthrough:
            raise SubmitError("--task eval needs the evaluation arguments after '--', e.g. "
                              "-- linear --backbone runs/vits14 --data data/brain_mri")
        eval_args, cfg, out_flag, default_out = resolve_eval_args(passthrough)
        if args.output_dir and out_flag and Path(args.output_dir).absolute() != Path(out_flag).absolute():
            raise SubmitError(f"--output-dir given twice with different values: {args.output_dir!r} (submit) and "
                              f"{out_flag!r} (eval arguments)")
        output_dir = Path(args.output_dir or out_flag or default_out).absolute()
        # Like training, the job evaluates with the config frozen at submission.
        job_args = _with_option(eval_args, "--output-dir", str(output_dir))
        job = EvalJob(_with_option(job_args, "--config", str(output_dir / SUBMITTED_EVAL_CONFIG)))
        cpus_default = 10

    job_name = args.job_name or f"dinov2-{args.task}-{output_dir.name}"
    params = slurm_parameters(args, args.task, cpus_default, job_name)
    world = params["nodes"] * params["ntasks_per_node"]
    if args.task == "train" and world > 1 and cfg.compute.parallelism == "none":
        # The engine would refuse this at start-up, after the wait in the queue: refuse it now.
        raise SubmitError(f"{world} processes ({params['nodes']} node(s) x {params['ntasks_per_node']}) but "
                          "compute.parallelism = 'none': add compute.parallelism=ddp (or fsdp) after '--'")
    return Submission(args.task, output_dir, params, args.max_timeout_requeues, args.python, job, cfg,
                      list(passthrough), args.dry_run)


def resolve_eval_args(eval_args: Sequence[str]):
    """Validate ``dinov2-repro eval`` arguments with its own parser and config loader.

    Returns (arguments, resolved eval config, --output-dir or None, the eval CLI's default run directory).
    """
    from dinov2_repro.eval.cli import build_parser as eval_parser
    from dinov2_repro.eval.cli import config_overrides, default_output_dir
    from dinov2_repro.eval.config import default_preset, load_eval_config

    parsed = eval_parser().parse_intermixed_args(list(eval_args))
    preset = Path(parsed.config) if parsed.config else default_preset(parsed.mode)
    cfg = load_eval_config(preset, config_overrides(parsed))
    return list(eval_args), cfg, parsed.output_dir, default_output_dir(parsed.mode, parsed.backbone)


def _with_option(argv: Sequence[str], flag: str, value: str) -> List[str]:
    """``argv`` with ``flag value`` set: an existing ``flag X`` / ``flag=X`` is replaced, else it is appended."""
    out, i, found = [], 0, False
    argv = list(argv)
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            out += [flag, value]
            i, found = i + 2, True
            continue
        if argv[i].startswith(flag + "="):
            out += [flag, value]
            i, found = i + 1, True
            continue
        out.append(argv[i])
        i += 1
    return out if found else out + [flag, value]


def render_sbatch(submission: Submission) -> str:
    """The sbatch script submitit will submit for ``submission``, rendered by submitit's own code.

    submitit has no public "render only" call and its SlurmExecutor refuses to start where ``srun`` is
    missing, so we use a subclass that skips that check and call the executor's script builder
    (``_make_submission_file_text``, the method submitit itself uses at submission). Same folder, same
    parameters, same python command: the text equals what ``sbatch`` receives.
    """
    from submitit.slurm.slurm import SlurmExecutor

    class _RenderOnlySlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = _RenderOnlySlurmExecutor(submission.folder, max_num_timeout=submission.max_timeout_requeues,
                                        python=submission.python)
    executor.update_parameters(**submission.slurm_parameters)
    if isinstance(submission.job, list):  # an array: what submitit sets when it submits one (--array=0-N%P)
        executor.parameters["map_count"] = len(submission.job)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def make_executor(submission: Submission, cluster: str = "slurm"):
    """submitit's AutoExecutor for ``submission`` (``cluster="slurm"``; "local"/"debug" for tests)."""
    kwargs: Dict[str, Any] = {}
    if cluster == "slurm":
        kwargs["slurm_max_num_timeout"] = submission.max_timeout_requeues
        if submission.python:
            kwargs["slurm_python"] = submission.python
    try:
        executor = submitit.AutoExecutor(folder=submission.folder, cluster=cluster, **kwargs)
    except RuntimeError as exc:
        if "srun" in str(exc):
            raise SubmitError("SLURM is not available here ('srun' is not on PATH). Use --dry-run to see the "
                              "sbatch script, or launch/torchrun.sh on this machine.") from exc
        raise
    if cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in submission.slurm_parameters.items()})
    else:
        executor.update_parameters(timeout_min=submission.slurm_parameters["time"],
                                   tasks_per_node=submission.slurm_parameters["ntasks_per_node"],
                                   nodes=submission.slurm_parameters["nodes"])
    return executor


def describe(submission: Submission) -> str:
    """Human summary printed by --dry-run and on submission."""
    p = submission.slurm_parameters
    lines = [f"task {submission.task}: {p['nodes']} node(s) x {p['ntasks_per_node']} task(s) per node "
             f"({p.get('gpus_per_node', 0)} GPU(s) per node), world size {submission.world_size}, "
             f"time limit {p['time']} min"]
    if submission.task == "train":
        _, _, text = effective_batch_and_lr(submission.cfg, submission.world_size)
        lines.append(text)
    elif submission.task == "wsi_tile":
        lines.append(f"runs: an array of {len(submission.job)} task(s) over {submission.cfg['slides']} slide(s), "
                     f"task I: dinov2-repro wsi {shlex.join(submission.job[0].argv[:-1])} I/{len(submission.job)}")
    else:
        lines.append(f"runs: dinov2-repro eval {shlex.join(submission.job.eval_args)}")
    lines.append(f"run directory {submission.output_dir}  (SLURM logs in {submission.folder})")
    return "\n".join(lines)


def resolved_config_text(submission: Submission) -> str:
    from omegaconf import OmegaConf

    if submission.task == "wsi_tile":  # no config: the tiling options travel on each task's command line
        return json.dumps(submission.cfg) + "\n"
    return OmegaConf.to_yaml(submission.cfg, resolve=True)


def submitted_config_name(submission: Submission) -> str:
    return SUBMITTED_CONFIG if submission.task == "train" else SUBMITTED_EVAL_CONFIG


def _freeze_inputs(submission: Submission) -> None:
    """Write the submitted config into the run directory; an older, different one is kept, not overwritten."""
    submission.output_dir.mkdir(parents=True, exist_ok=True)
    path = submission.output_dir / submitted_config_name(submission)
    text = resolved_config_text(submission)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        os.replace(path, kept)
        print(f"note: {path.name} differed from this submission; the previous one is kept as {kept.name}")
    from dinov2_repro.config import save_config

    save_config(submission.cfg, path)


def submit(submission: Submission, cluster: str = "slurm"):
    """Freeze the inputs, submit, and record the job id; returns the submitit Job."""
    if submission.task == "train":
        resume_from = resume_point(submission.output_dir)
        if resume_from is not None:
            print(f"note: {submission.output_dir} already holds a checkpoint; the job resumes from {resume_from}")
    if submission.task != "wsi_tile":
        _freeze_inputs(submission)
    executor = make_executor(submission, cluster=cluster)
    try:
        if isinstance(submission.job, list):  # one SLURM array
            with executor.batch():
                jobs = [executor.submit(task) for task in submission.job]
            job = jobs[0]
        else:
            job = executor.submit(submission.job)
    except submitit.core.utils.FailedJobError as exc:  # sbatch said no (bad partition, account, limits, ...)
        raise SubmitError(f"sbatch refused the job: {str(exc).strip() or exc.__cause__}") from exc
    submission.output_dir.mkdir(parents=True, exist_ok=True)
    append_job_record(submission.output_dir, {
        "event": "submitted", "time": _now(), "job_id": str(job.job_id), "task": submission.task,
        "array_tasks": len(submission.job) if isinstance(submission.job, list) else None,
        "cluster": cluster, "nodes": submission.slurm_parameters["nodes"],
        "tasks_per_node": submission.slurm_parameters["ntasks_per_node"],
        "gpus_per_node": submission.slurm_parameters.get("gpus_per_node", 0),
        "world_size": submission.world_size, "arguments": submission.passthrough,
        "log_folder": str(submission.folder).replace("%j", str(job.job_id)),
    })
    return job


def dry_run_text(submission: Submission) -> str:
    """What --dry-run prints: a summary, the sbatch script and the resolved config."""
    target = submitted_config_name(submission)
    what = ("tiling array" if submission.task == "wsi_tile"
            else f"resolved config (saved as <run>/{target} on submission)")
    parts = ["# dinov2-repro submit --dry-run: nothing was submitted",
             "\n".join(f"# {line}" for line in describe(submission).splitlines()),
             "# ---------------- sbatch script (rendered by submitit) ----------------",
             render_sbatch(submission).rstrip("\n"),
             f"# ---------------- {what} ----------------",
             resolved_config_text(submission).rstrip("\n")]
    return "\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dinov2-repro submit [options] -- [training or eval arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        submission = prepare_submission(argv)
        if submission.dry_run:
            print(dry_run_text(submission), end="")
            return 0
        job = submit(submission)
    except SubmitError as exc:
        print(f"dinov2-repro submit: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # ConfigError, missing files: the message names key, value and file
        print(f"dinov2-repro submit: error: {exc}", file=sys.stderr)
        return 2
    print(describe(submission))
    print(f"submitted job {job.job_id}; logs: {str(submission.folder).replace('%j', str(job.job_id))}")
    print(f"follow it with: tail -f {submission.folder.parent / str(job.job_id)}/{job.job_id}_0_log.out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
