"""What a run reports: ``metrics.jsonl``, a progress bar with ETA, optional TensorBoard / wandb, loss curves.

Only rank 0 writes. Every optional backend is imported lazily and skipped with a warning when missing; wandb
runs offline unless ``logging.wandb_mode: online`` (it never touches the network by default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..files import write_text_atomic

log = logging.getLogger("dinov2_repro.train")


def peak_memory_mb(device_type: str) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on GPU, peak resident set size on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def read_metrics(path: os.PathLike) -> List[dict]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    path = Path(path)
    return parse_metrics_lines(path.read_text().splitlines()) if path.exists() else []


def parse_metrics_lines(lines: List[str]) -> List[dict]:
    """The records of JSONL lines, skipping any that do not parse (a line cut off by a killed run)."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    """Rank-0 sink for per-period metrics; a no-op object on the other ranks."""

    def __init__(self, run_dir: os.PathLike, cfg, is_main: bool, start_iter: int, total_iters: int):
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.start_iter, self.total_iters = start_iter, total_iters
        self._bar = self._tb = self._wandb = None
        if not is_main:
            return
        self._truncate_after(start_iter)
        if cfg.logging.progress_bar:
            self._bar = self._make_bar()
        if cfg.logging.tensorboard:
            self._tb = self._make_tensorboard()
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            self._wandb = self._make_wandb(cfg)

    def _truncate_after(self, start_iter: int) -> None:
        """On resume, drop records of iterations that will be recomputed (they happened after the checkpoint),
        and a torn line (a run killed mid-write), which the next append would otherwise be glued onto."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        n_lines, records = len(lines), parse_metrics_lines(lines)
        if n_lines != len(records):
            log.warning("%s: dropping %d unreadable line(s), most likely cut off when a run was killed",
                        self.path, n_lines - len(records))
        kept = [r for r in records if r.get("iteration", 0) <= start_iter]
        if len(kept) != len(records):
            log.info("metrics.jsonl: dropping %d records after iteration %d (re-run after resume)",
                     len(records) - len(kept), start_iter)
        if len(kept) != n_lines:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def _make_bar(self):
        try:
            from tqdm import tqdm
        except ImportError:
            log.warning("tqdm is not installed: no progress bar (pip install tqdm)")
            return None
        return tqdm(total=self.total_iters, initial=self.start_iter, desc="train", unit="it", dynamic_ncols=True,
                    file=sys.stderr, smoothing=0.1)

    def _make_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("logging.tensorboard is true but tensorboard is not installed; skipping it "
                        "(pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _make_wandb(self, cfg):
        try:
            import wandb
        except ImportError:
            log.warning("logging.wandb is true but wandb is not installed; skipping it")
            return None
        from dinov2_repro.config import config_to_dict

        import secrets

        # One id per run directory, so a resumed run appends to the same wandb run.
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        try:  # `mode` is passed explicitly: offline unless the config says online, whatever the environment
            return wandb.init(project=cfg.logging.wandb_project, dir=str(self.run_dir), id=run_id, resume="allow",
                              mode=cfg.logging.wandb_mode, config=config_to_dict(cfg))
        except Exception as error:  # a logging backend must never stop training
            log.warning("wandb.init failed (%s: %s); continuing without wandb", type(error).__name__, error)
            return None

    def step(self, iteration: int, postfix: Optional[Dict[str, float]] = None) -> None:
        """Advance the progress bar to ``iteration`` completed iterations."""
        if self._bar is not None:
            self._bar.n = iteration
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def log(self, record: Dict[str, float]) -> None:
        """Append one record (must contain ``iteration``) to every sink."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        it = record["iteration"]
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, it)
        if self._wandb is not None:
            self._wandb.log(numeric, step=it)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._wandb = None


class Throughput:
    """Images/s and per-iteration data/step time averaged over one log period."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.images, self.data_time, self.step_time, self.iters = 0, 0.0, 0.0, 0
        self.t0 = time.perf_counter()

    def add(self, images: int, data_time: float, step_time: float):
        self.images += images
        self.data_time += data_time
        self.step_time += step_time
        self.iters += 1

    def summary(self) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        n = max(self.iters, 1)
        return {"images_per_s": self.images / elapsed, "data_time_s": self.data_time / n,
                "step_time_s": self.step_time / n}


LOSS_KEYS_FIRST = ("total_loss", "dino_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss",
                   "koleo_loss")


def plot_loss_curves(metrics_path: os.PathLike, out_png: os.PathLike) -> Optional[Path]:
    """Plot every ``*loss*`` series and the schedules of ``metrics.jsonl`` into one PNG (matplotlib Agg)."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss_curves.png")
        return None

    def series(key):
        points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for r in records for k in r if "loss" in k})
    keys = [k for k in LOSS_KEYS_FIRST if k in keys] + [k for k in keys if k not in LOSS_KEYS_FIRST]
    schedule_keys = [k for k in ("lr", "wd", "momentum", "teacher_temp") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in keys:
        axes[0].plot(*series(key), label=key)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("losses (as optimised)")
    axes[0].legend(fontsize=8)
    for key in schedule_keys:
        xs, ys = series(key)
        top = max((abs(y) for y in ys), default=1.0) or 1.0
        axes[1].plot(xs, [y / top for y in ys], label=f"{key} / {top:.3g}")
    axes[1].set_xlabel("iteration")
    axes[1].set_title("schedules (normalised by their max)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
