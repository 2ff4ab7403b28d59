"""Shared helpers for the benchmark scripts: devices, timing, peak memory, matmul peak, FLOP counting, JSON.

Conventions used by every script (and printed by them):
- A "MAC" is one fused multiply-add. fvcore's FlopCountAnalysis reports MACs under the name "flops";
  hardware FLOPs = 2 x MACs. torch.utils.flop_counter reports hardware FLOPs directly (2 per MAC).
- Times are wall-clock seconds around a synchronised step (CUDA work is waited for).
- Peak memory: on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, no
  allocator cache). On CPU there is no allocator statistic: we report how far the process's resident set size
  rose above its value at the start of the measured section (Linux: the kernel's high-water mark VmHWM, reset
  at the start; elsewhere the increase of getrusage's ru_maxrss, a lower bound).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

# The colour photographs shipped inside scikit-image that the benchmarks cut their colour test images from
# (nothing is downloaded).
SKIMAGE_COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
                         "hubble_deep_field")

# ---------------------------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available else cpu; "cuda" without a GPU is an error naming the problem."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (the typed one, or the RuntimeError older code paths raise)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------- timing


def time_iterations(step: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> List[float]:
    """Run `step` warmup + iters times; return the wall-clock seconds of each of the last `iters` calls."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(max(0, warmup)):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def time_steps(step: Callable[[], Any], warmup: int, iters: int, device: torch.device):
    """A training-step benchmark's timing: the first call alone (it compiles and allocates), ``warmup - 1`` more
    untimed, then ``iters`` timed. Returns (first call's result, its seconds, the timed seconds, `PeakMemory`);
    on CUDA the peak covers the timed iterations only, on CPU everything from the first call."""
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        first = step()
        synchronize(device)
        first_s = time.perf_counter() - start
        for _ in range(max(0, warmup - 1)):
            step()
        if device.type == "cuda":  # steady state: peak over the timed iterations only
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = time_iterations(step, iters, 0, device)
    return first, first_s, times, memory


def summarize_times(times: Sequence[float]) -> Dict[str, float]:
    """mean / median / min / max / std (seconds) of per-iteration times."""
    times = list(times)
    return {
        "mean_s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "std_s": statistics.pstdev(times) if len(times) > 1 else 0.0,
        "n": len(times),
    }


# ---------------------------------------------------------------------------------------------- memory


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (bytes; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: reset the process's RSS high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of the enclosed section (see the module docstring).

    After exit: `.peak_bytes`, `.kind` and `.note`. CUDA: max_memory_allocated (call
    `torch.cuda.reset_peak_memory_stats` inside the section to measure from there). CPU: the peak RSS during the
    section minus the RSS at its start; on Linux the kernel's high-water mark is reset at entry, elsewhere the
    increase of ru_maxrss is used (a lower bound when the process peaked higher before).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss_delta"
        self.note = "torch.cuda.max_memory_allocated (tensor memory, allocator cache excluded)"
        self._rss_before = 0
        self._hwm_reset = False

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._hwm_reset = _reset_peak_rss()
        if self._hwm_reset:
            self._rss_before = 1024 * (_proc_status_kib("VmRSS") or 0)
            self.note = ("CPU: process peak RSS (VmHWM, reset at the start) minus the RSS at the start of the "
                         "measured steps; not an allocator statistic")
        else:
            self._rss_before = peak_rss_bytes()
            self.note = ("CPU: increase of the process peak RSS (ru_maxrss) during the measured steps; a lower "
                         "bound of the steps' working memory, not an allocator statistic")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._hwm_reset:
            self.peak_bytes = max(0, 1024 * (_proc_status_kib("VmHWM") or 0) - self._rss_before)
        else:
            self.peak_bytes = max(0, peak_rss_bytes() - self._rss_before)


# ---------------------------------------------------------------------------------------------- matmul peak


def measure_matmul_peak(device: torch.device, size: Optional[int] = None, iters: Optional[int] = None,
                        dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Dense matmul throughput measured here, the denominator of MFU.

    CUDA: bf16 size^3 matmuls (default 8192); CPU: fp32 (default 2048), since CPU bf16 matmul speed depends on
    ISA extensions and fp32 is what the CPU figures run in. Returns FLOP/s with 2 FLOPs per multiply-add.
    """
    if device.type == "cuda":
        dtype = dtype or torch.bfloat16
        size = size or 8192
        iters = iters or 50
        warmup = 10
    else:
        dtype = dtype or torch.float32
        size = size or 2048
        iters = iters or 5
        warmup = 2
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times = time_iterations(lambda: torch.matmul(a, b, out=out), iters=iters, warmup=warmup, device=device)
    best = min(times)  # the peak: least disturbed by other work on the machine
    flops = 2.0 * size ** 3
    del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "flops_per_s": flops / best,
        "median_flops_per_s": flops / statistics.median(times),
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "iters": iters,
        "label": (f"measured {str(dtype).replace('torch.', '')} {size}x{size}x{size} matmul peak on "
                  f"{device_name(device)}" + ("" if device.type == "cuda" else
                                                " (CPU fp32 peak, not a bf16 tensor-core peak)")),
    }


# ---------------------------------------------------------------------------------------------- FLOPs


def _sdpa_mac_handle(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: QK^T and AV, B*H*N*M*(d + d_v) MACs."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    *batch, n_q, d = q_shape
    n_kv, d_v = k_shape[-2], v_shape[-1]
    return int(math.prod(batch) * n_q * n_kv * (d + d_v))


def count_macs_fvcore(module: torch.nn.Module, inputs: tuple) -> Dict[str, Any]:
    """fvcore FlopCountAnalysis of `module(*inputs)`: total MACs, per-operator MACs, ops it left uncounted.

    fvcore has no handle for SDPA; we add one (attention scores and weighted sum), so attention is counted.
    """
    import warnings

    with warnings.catch_warnings():  # torch.jit deprecation notices from fvcore's import-time jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    for op in ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention"):
        analysis.set_op_handle(op, _sdpa_mac_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():  # ... and from the tracer it relies on
        warnings.simplefilter("ignore", FutureWarning)
        total = int(analysis.total())
    return {
        "counter": "fvcore",
        "macs": total,
        "by_operator": {k: int(v) for k, v in analysis.by_operator().items()},
        "uncounted_ops": dict(analysis.unsupported_ops()),
    }


def count_macs_torch(fn: Callable[[], Any]) -> Dict[str, Any]:
    """torch.utils.flop_counter of `fn()` (dispatcher level: no tracing). Its FLOPs / 2 = MACs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(k): int(v) // 2 for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"counter": "torch.utils.flop_counter", "macs": int(counter.get_total_flops()) // 2,
            "by_operator": by_op, "uncounted_ops": {"(elementwise and normalisation ops)": -1}}


# ---------------------------------------------------------------------------------------------- reporting


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment_info(device: torch.device) -> Dict[str, Any]:
    """What the figures were taken on, including the load average (other processes competing for cores)."""
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def fmt_si(value: float, unit: str = "") -> str:
    """1.23e12 -> '1.23 T<unit>'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2 ** 30:.3f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    """Write `payload` as indented JSON (nothing when path is empty)."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out}")
