"""Where am I in a distributed job? Read it from the environment, once, without global state.

Three launch modes give one `DistEnv`:

* ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``);
  it wins whenever its variables are present, even inside a SLURM allocation (``srun torchrun ...``).
* ``srun`` without torchrun: one process per task; ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` give the
  ranks, the first host of ``SLURM_JOB_NODELIST`` is the rendezvous address and the port is derived from
  ``SLURM_JOB_ID`` so that concurrent jobs sharing a node do not collide. A batch script or an ``salloc`` shell
  also carries SLURM variables but is a single process: we only trust them inside a job *step*
  (``SLURM_STEP_ID`` set), which is what srun creates.
* otherwise a single process.

`init_distributed` turns a `DistEnv` into a process group (gloo on CPU, NCCL on CUDA) and `teardown` closes it.
The only mutable state is torch.distributed's own default process group.
"""

from __future__ import annotations

import os
import time
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_BASE = 20000  # ports 20000-39999: above the usual services, below the Linux ephemeral range
SLURM_PORT_SPAN = 20000


class DistEnvError(RuntimeError):
    """The launch environment is inconsistent; the message names the variables and their values."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single" (the engine adds "external": a group made by its caller)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when this process is one of several launched together (a process group is needed)."""
        return self.source != "single"


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _split_top_level(text: str) -> List[str]:
    """Split a SLURM host list on the commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise DistEnvError(f"SLURM host list {text!r} has unbalanced brackets")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range_set(spec: str, hostlist: str) -> List[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] keeping the zero padding of each bound."""
    values = []
    for item in spec.split(","):
        if "-" in item:
            low, high = item.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
                raise DistEnvError(f"bad range {item!r} in SLURM host list {hostlist!r}")
            width = len(low)
            values += [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
        elif item:
            values.append(item)
    return values


def expand_hostlist(hostlist: str) -> List[str]:
    """Expand a compact SLURM host list: ``'gpu[01-03,07],cpu5'`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Several bracket groups in one name (``rack[1-2]-node[1-2]``) expand to their product, as SLURM does.
    """
    hosts: List[str] = []
    for name in _split_top_level(hostlist.strip()):
        expanded = [""]
        for match in re.finditer(r"([^\[]+)|\[([^\]]*)\]", name):
            literal, ranges = match.group(1), match.group(2)
            options = [literal] if literal is not None else _expand_range_set(ranges, hostlist)
            expanded = [prefix + option for prefix in expanded for option in options]
        hosts += expanded
    if not hosts:
        raise DistEnvError(f"SLURM host list {hostlist!r} names no host")
    return hosts


def parse_tasks_per_node(text: str) -> List[int]:
    """Expand ``SLURM_TASKS_PER_NODE`` (``'4(x2),3'``) into one count per node: [4, 4, 3]."""
    counts: List[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={text!r}: cannot parse {item!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _torchrun_env(environ: Mapping[str, str]) -> DistEnv:
    missing = [n for n in ("RANK", "WORLD_SIZE") if n not in environ]
    if missing:
        raise DistEnvError(f"torchrun-style launch is missing {missing} (RANK and WORLD_SIZE go together)")
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    if world < 1:
        raise DistEnvError(f"WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        raise DistEnvError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if not 0 <= local_rank < local_world:
        raise DistEnvError(f"LOCAL_RANK={local_rank} is outside [0, LOCAL_WORLD_SIZE={local_world})")
    if local_world > world:
        raise DistEnvError(f"LOCAL_WORLD_SIZE={local_world} exceeds WORLD_SIZE={world}")
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(n)]
        if missing:
            raise DistEnvError(f"WORLD_SIZE={world} but {missing} not set: the processes cannot find each other "
                               "(launch with torchrun, or export MASTER_ADDR and MASTER_PORT)")
    addr = environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else DEFAULT_MASTER_PORT
    return DistEnv(rank, local_rank, world, local_world, addr, port, "torchrun")


def _slurm_env(environ: Mapping[str, str]) -> DistEnv:
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        if name not in environ:
            raise DistEnvError(f"inside a SLURM job step but {name} is not set")
    rank, world, local_rank = (_int(environ, n) for n in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    if world < 1:
        raise DistEnvError(f"SLURM_NTASKS={world} must be >= 1")
    if not 0 <= rank < world:
        raise DistEnvError(f"SLURM_PROCID={rank} is outside [0, SLURM_NTASKS={world})")
    if "SLURM_NPROCS" in environ and _int(environ, "SLURM_NPROCS") != world:
        raise DistEnvError(f"SLURM_NPROCS={environ['SLURM_NPROCS']} disagrees with SLURM_NTASKS={world}")

    # Tasks on this node: the per-node list (uneven layouts) is authoritative, else the uniform count.
    if "SLURM_TASKS_PER_NODE" in environ:
        per_node = parse_tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        if sum(per_node) != world:
            raise DistEnvError(f"SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r} sums to {sum(per_node)} "
                               f"but SLURM_NTASKS={world}")
        node_id = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        if not 0 <= node_id < len(per_node):
            raise DistEnvError(f"SLURM_NODEID={node_id} is outside the {len(per_node)} nodes of "
                               f"SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r}")
        local_world = per_node[node_id]
    elif "SLURM_NTASKS_PER_NODE" in environ:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
        nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
        if nodes is not None and int(nodes) * local_world != world:
            raise DistEnvError(f"SLURM_NTASKS_PER_NODE={local_world} x {nodes} nodes != SLURM_NTASKS={world}")
    else:
        local_world = world
    if not 0 <= local_rank < local_world:
        raise DistEnvError(f"SLURM_LOCALID={local_rank} is outside [0, tasks on this node = {local_world})")

    # An explicit MASTER_ADDR/PORT wins (users behind odd network setups); else first node, port from job id.
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = (environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
                    or environ.get("SLURM_STEP_NODELIST"))
        if nodelist:
            addr = expand_hostlist(nodelist)[0]
        elif world == 1:
            addr = DEFAULT_MASTER_ADDR
        else:
            raise DistEnvError(f"SLURM_NTASKS={world} but SLURM_JOB_NODELIST is not set: cannot pick the "
                               "rendezvous host (export MASTER_ADDR)")
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    elif "SLURM_JOB_ID" in environ:
        port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    else:
        port = DEFAULT_MASTER_PORT
    return DistEnv(rank, local_rank, world, local_world, addr, port, "slurm")


def detect_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Return this process's `DistEnv`: torchrun variables first, then a SLURM job step, else single process.

    Raises `DistEnvError` naming the variables when they contradict each other.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun_env(environ)
    in_slurm_step = "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    if in_slurm_step:
        return _slurm_env(environ)
    return DistEnv(0, 0, 1, 1, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, "single")


def select_backend(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(env: DistEnv, backend: Optional[str] = None, device_type: Optional[str] = None,
                     timeout_s: float = 1800.0) -> Optional[str]:
    """Create the default process group for ``env`` and return its backend (None for a single process).

    ``backend`` defaults to NCCL when CUDA is used and gloo otherwise; on CUDA the current device is set
    from ``env.local_rank`` first, so every process talks to its own GPU. Calling it again when a group
    already exists is an error, since it would silently reuse a group with possibly different ranks.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        n_devices = torch.cuda.device_count()
        # Clusters that bind one GPU per task show each process a single device: use it.
        if n_devices != 1 and env.local_rank >= n_devices:
            raise DistEnvError(f"local rank {env.local_rank} but only {n_devices} CUDA devices "
                               "visible on this node (check CUDA_VISIBLE_DEVICES / --nproc-per-node)")
        torch.cuda.set_device(env.local_rank % n_devices)
    if not env.is_distributed:
        return None
    if dist.is_initialized():
        raise DistEnvError("a torch.distributed process group already exists; call teardown() first")
    backend = backend or select_backend(device_type)
    if env.source == "torchrun" and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        init_method = "env://"  # reuse torchrun's rendezvous store
    else:
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    dist.init_process_group(backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def teardown() -> None:
    """Destroy the default process group if one exists (safe to call in `finally`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            # torch 2.4, gloo: a worker thread that drops the last reference to a reduced tensor needs the GIL,
            # which destroy_process_group holds while it joins that thread, so it deadlocked in about one run in
            # three (measured). The barrier finishes every collective; the pause lets the workers let go first.
            dist.barrier()
            time.sleep(0.1)
        dist.destroy_process_group()
