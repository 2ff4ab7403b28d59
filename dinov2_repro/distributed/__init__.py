"""Distributed launch and parallelism policy.

* `env`: read rank/world size from torchrun or SLURM variables; create and destroy the process group.
* `parallelize`: DDP / FSDP2 wrapping of the SSL meta-architecture (the only place that imports FSDP).
* `compile`: per-block ``torch.compile`` and activation checkpointing.
* `submit`: SLURM submission through submitit (imported only by ``dinov2-repro submit`` and its jobs).

Model code never imports this package: the engine applies these policies to finished modules.
"""

from .env import DistEnv, DistEnvError, detect_env, expand_hostlist, init_distributed, teardown

__all__ = ["DistEnv", "DistEnvError", "detect_env", "expand_hostlist", "init_distributed", "teardown"]
