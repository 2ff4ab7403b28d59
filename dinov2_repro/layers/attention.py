"""Multi-head self-attention (Vaswani et al. 2017) with a fused kernel.

The default kernel is torch.nn.functional.scaled_dot_product_attention, which needs nothing beyond PyTorch.
xFormers' memory_efficient_attention is used only when the caller asked for it (backend "auto" or "xformers"),
the input is on CUDA, and xFormers' attention actually runs on this machine's GPU: a wheel built without CUDA
kernels imports fine but fails at the first call (seen with xformers 0.0.35 on torch 2.11), so "auto" probes
once and keeps SDPA then. Asking for "xformers" when it cannot run is an error at construction time naming
why, not a silent fallback. Parameter names `qkv` (packed [q; k; v], heads contiguous) and `proj` match the
published DINOv2 checkpoints.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_BACKENDS = ("sdpa", "xformers", "auto")


@functools.lru_cache(maxsize=1)  # every block asks when it is built; a failed import is not cached by Python
def xformers_import_problem() -> str:
    """'' when xformers.ops imports, else why not."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a binary built against another torch/CUDA
        return f"xformers.ops cannot be imported ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return ""


@functools.lru_cache(maxsize=1)  # a fact of the installation and the GPU: probe once per process
def xformers_cuda_problem() -> str:
    """'' when xFormers' memory_efficient_attention runs on this machine's GPU, else why not."""
    problem = xformers_import_problem()
    if problem:
        return problem
    if not torch.cuda.is_available():
        return "no CUDA device is visible (xFormers attention runs on CUDA only)"
    from xformers.ops import memory_efficient_attention

    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        memory_efficient_attention(q, q, q)
    except Exception as exc:  # NotImplementedError "No operator found" when built without CUDA kernels
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"xformers is installed but its attention does not run on this GPU ({type(exc).__name__}: {first})"
    return ""


def resolve_attn_backend(backend: str) -> str:
    """Map a requested backend ("sdpa" | "xformers" | "auto") to the one that will run: "sdpa" or "xformers"."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={backend!r} is not one of {ATTN_BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    import_problem = xformers_import_problem()
    # Without a GPU the forward uses SDPA anyway; with one, xFormers must really run there.
    problem = import_problem or (xformers_cuda_problem() if torch.cuda.is_available() else "")
    if backend == "xformers" and problem:
        raise ImportError(f"attn_backend='xformers' was requested but {problem}; install an xformers build for "
                          "this torch and GPU, or use attn_backend='sdpa' (PyTorch's fused attention) or 'auto'")
    if backend == "auto" and (problem or not torch.cuda.is_available()):
        return "sdpa"
    return "xformers"


class Attention(nn.Module):
    """(B, N, D) -> (B, N, D): qkv projection, per-head softmax(q k^T / sqrt(d)) v, output projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.backend = resolve_attn_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, n_tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, n_tokens, 3, self.num_heads, self.head_dim)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.backend == "xformers" and x.is_cuda:
            from xformers.ops import memory_efficient_attention

            q, k, v = qkv.unbind(2)  # each (B, N, H, d): xFormers' layout
            out = memory_efficient_attention(q, k, v, p=dropout_p)  # (B, N, H, d)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d): SDPA's layout
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(1, 2)  # (B, N, H, d)
        out = out.reshape(batch, n_tokens, dim)
        return self.proj_drop(self.proj(out))
