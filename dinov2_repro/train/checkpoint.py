"""Training checkpoints that resume exactly, atomically, on any number of processes.

What a checkpoint holds (`save_checkpoint`):

* ``model``: the whole `SSLMetaArch` state dict, names as in the unwrapped module (``student.backbone.*``,
  ``teacher.dino_head.*``, loss centers as buffers), whatever DDP / FSDP / compile wrapping is applied;
* ``optimizer``: AdamW state keyed by parameter *name* (``torch.distributed.checkpoint.state_dict`` layout), so it
  does not depend on parameter order or sharding;
* ``meta``: iteration (number of completed iterations), the grad scaler state, every rank's RNG states (torch
  CPU, CUDA, numpy, python), the world size and per-rank batch that produced it, the resolved config and engine
  counters (skipped batches, ...). The data sampler position is *derived* from the iteration:
  each rank has consumed ``iteration * batch_size_per_gpu * grad_accum_steps`` samples.

Two on-disk formats, chosen by the parallelism:

* single process / DDP: one file ``checkpoints/checkpoint_<iter>.pth`` written by rank 0 (``torch.save`` of
  full tensors on CPU);
* FSDP: a folder ``checkpoints/checkpoint_<iter>/`` written by every rank with ``torch.distributed.checkpoint``
  (each rank writes its shards) plus ``meta.pt``. DCP reshards on load, so an N-process checkpoint resumes on M
  processes, including M = 1 without FSDP; a plain file also loads into an FSDP run.

Both are atomic: everything is written under a ``.tmp`` name, renamed, and only then ``checkpoints/latest``
(a one-line text file naming the checkpoint) is replaced. A crash mid-save leaves the previous checkpoint and
``latest`` intact. Only the last ``checkpoint.keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import write_text_atomic

log = logging.getLogger("dinov2_repro.train")

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint_(\d+)(\.pth)?$")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier():
    dist = _dist()
    if dist is not None:
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process_dcp():
    # DCP warns that it "assumes a single process" when there is no process group: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


# ------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states: torch CPU, current CUDA device, numpy global, python ``random``."""
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA state only restored when CUDA is in use here too)."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _gather_rng_states() -> List[Dict[str, Any]]:
    state = capture_rng_state()
    dist = _dist()
    if dist is None:
        return [state]
    states: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- locations
def checkpoints_dir(run_dir: os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: os.PathLike, iteration: int, sharded: bool) -> Path:
    name = f"checkpoint_{iteration:07d}"
    return checkpoints_dir(run_dir) / (name if sharded else name + ".pth")


def list_checkpoints(run_dir: os.PathLike) -> List[Path]:
    """Complete checkpoints of a run (no ``.tmp`` leftovers), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: os.PathLike) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` points to, or None for a fresh run.

    A ``latest`` that names a missing checkpoint is an error (resuming from an older one silently would
    redo or lose work without telling anybody).
    """
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if not path.exists():
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist; point it at one of "
                                f"{[p.name for p in list_checkpoints(run_dir)]} or delete it to start fresh")
    return path


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _prune(run_dir: os.PathLike, keep_last: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _remove(old)


# ------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: os.PathLike, iteration: int, model, optimizer, meta: Dict[str, Any], *,
                    sharded: bool, keep_last: int, scaler=None) -> Path:
    """Write a checkpoint of ``iteration`` completed iterations; collective: every rank must call it.

    ``model`` is the (possibly DDP/FSDP-wrapped) meta-architecture, ``meta`` a picklable dict merged into the
    checkpoint's metadata (config, counters). Returns the checkpoint path.
    """
    rank = _rank()
    final = checkpoint_path(run_dir, iteration, sharded)
    tmp = final.with_name(final.name + ".tmp")
    meta = dict(meta, iteration=iteration, format_version=FORMAT_VERSION, rng=_gather_rng_states(),
                world_size=(_dist().get_world_size() if _dist() else 1),
                grad_scaler=scaler.state_dict() if scaler is not None and scaler.is_enabled() else None)
    if rank == 0:
        checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # leftover of a crashed save
    _barrier()
    try:
        _write_checkpoint(tmp, model, optimizer, meta, sharded, rank)
    except BaseException:
        if rank == 0:  # a full disk or a kill: drop the partial file; `latest` still names the last good one
            _remove(tmp)
        raise
    _barrier()
    if rank == 0:
        _remove(final)
        os.replace(tmp, final)
        write_text_atomic(checkpoints_dir(run_dir) / LATEST, final.name + "\n")
        _prune(run_dir, keep_last)
    _barrier()
    return final


def _write_checkpoint(tmp: Path, model, optimizer, meta: Dict[str, Any], sharded: bool, rank: int) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if sharded:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)  # local shards (DTensors), no gathering
        with _quiet_single_process_dcp():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
        if rank == 0:
            torch.save(meta, tmp / "meta.pt")
    else:
        # Unsharded modules: full tensors are local already; copy to CPU so the file loads anywhere.
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=True))
        if rank == 0:
            torch.save({"model": model_sd, "optimizer": optim_sd, "meta": meta}, tmp)


def _is_sharded(model) -> bool:
    """True when some parameter is a DTensor (FSDP2): such a model loads full state dicts by distributing them."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory can be loaded; the message names each one and why."""


def load_newest_loadable(run_dir: os.PathLike, model, optimizer, scaler=None):
    """Load the checkpoint ``latest`` names; when it cannot be read (cut off by a full disk or a killed copy),
    warn naming it and fall back to the next older one. Returns ``(path, meta)``, or ``(None, {})`` for a fresh
    run; raises `CheckpointError` when none loads."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None, {}
    ordered = list_checkpoints(run_dir)
    older = ordered[:ordered.index(latest)][::-1] if latest in ordered else []
    candidates, failures = [latest, *older], []
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path, model, optimizer, scaler)
        except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            failures.append(f"{path.name} ({type(error).__name__}: {error})")
            log.warning("checkpoint %s cannot be loaded (%s: %s)%s", path, type(error).__name__, error,
                        "; trying the next older one" if i + 1 < len(candidates) else "")
    hint = ""
    if any("weight_g" in failure for failure in failures):  # the head's gain g trains since 2026-11-29
        hint = (" (a run started while the DINO head's gain g was fixed has no last_layer.weight_g: resume it with "
                "dino.head_norm_last_layer=true ibot.head_norm_last_layer=true)")
    raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)} can be loaded: {'; '.join(failures)}{hint}")


def load_checkpoint(path: os.PathLike, model, optimizer, scaler=None) -> Dict[str, Any]:
    """Load model, optimizer and grad-scaler state from ``path`` (file or DCP folder) into the live objects.

    Works across world sizes and between the two formats. Returns the checkpoint's ``meta`` dict
    (iteration, rng, world_size, config, counters). RNG states are *not* restored here: see `restore_rank_rng`.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        # Templates with this process's own layout (shards or full tensors); DCP fills them, resharding as needed.
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with _quiet_single_process_dcp():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt["meta"]
        options = StateDictOptions(full_state_dict=_is_sharded(model))
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                       options=options)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    if scaler is not None and scaler.is_enabled() and meta.get("grad_scaler") is not None:
        scaler.load_state_dict(meta["grad_scaler"])
    return meta


def restore_rank_rng(meta: Dict[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's RNG states saved in ``meta``; returns False (and warns) when that is impossible.

    Exact continuation of random streams (drop path, iBOT masks drawn from the global RNG) needs the same world
    size; on a different one each rank takes the state saved by ``rank % saved_world_size``.
    """
    states = meta.get("rng") or []
    if not states:
        return False
    restore_rng_state(states[rank % len(states)])
    if len(states) != world_size:
        log.warning("resuming a %d-process checkpoint on %d processes: random streams (drop path, masks) "
                    "continue from rank %d's state but cannot match the original run exactly",
                    len(states), world_size, rank % len(states))
        return False
    return True


def read_checkpoint_file(path: os.PathLike) -> Dict[str, Any]:
    """A whole single-file checkpoint (``model``, ``optimizer``, ``meta``), memory-mapped, without loading it into
    a model. It holds Python objects (RNG states, config), so only files of ours are read this way."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def read_checkpoint_meta(path: os.PathLike) -> Dict[str, Any]:
    """The ``meta`` dict of a checkpoint without loading any model."""
    import torch

    path = Path(path)
    if path.is_dir():
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["meta"]
